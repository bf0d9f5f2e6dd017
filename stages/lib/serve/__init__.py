"""Talking to the tuned model after the pipeline: the terminal chat (`python -m stages.chat`) and the
OpenAI-compatible server (`python -m stages.serve`, transformers serve behind a request check).

Both build the prompt as every server does, with the chat template that models/merged carries
(`apply_chat_template(messages, add_generation_prompt=True)`), which tokenize checked to give the training prompt
id for id, and stop at the stop tokens of its generation_config.json. No pipeline stage depends on this package.
"""

"""The prompt format, from a raw record to the ids a server builds: records, templates, encoding.

tokenize decides the format once (`format.decide`) and saves it with the tokenizer into data/tokenized/tokenizer;
train, merge and eval read that tokenizer, so every stage and every server uses the same prompt.
"""

"""The training curves: what the train stage logs to DVCLive (dvclive/train, drawn by dvc.yaml's plots)."""

from __future__ import annotations

from pathlib import Path

# logged values worth a curve; the rest (epoch, runtimes, samples/s, total_flos, the run's mean loss) is not
PLOTTED = ("loss", "eval_loss", "learning_rate", "grad_norm", "entropy", "mean_token_accuracy",
           "aux_loss")  # aux_loss: a mixture of experts' router load-balancing loss (TRL logs it)


def dvclive_callbacks(live_dir: Path, resume: bool = False) -> list:
    """The Trainer callback that writes the PLOTTED values to DVCLive in `live_dir` per optimizer step (`resume`:
    append to the curves restored from a checkpoint); [] with a printed line where dvclive is not installed."""
    try:
        from dvclive import Live
    except ImportError:  # e.g. a worker node with only the training stack
        print("train: dvclive is not installed; the loss curve is kept in train_config.json only")
        return []
    from transformers.integrations import DVCLiveCallback

    class Callback(DVCLiveCallback):
        """transformers' DVCLive logging, minus its dump of ~180 TrainingArguments: params.yaml is the record."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            # "loss" becomes train/loss.tsv, so that the chart's legend reads train/… next to eval/…
            logs = {("train_loss" if k == "loss" else k): v for k, v in (logs or {}).items() if k in PLOTTED}
            if not logs:
                return
            if not self._initialized:
                self.setup(args, state, kwargs.get("model"))
            if self.live is not None:
                self.live.step = state.global_step  # plot against optimizer steps, not the count of log calls
            super().on_log(args, state, control, logs=logs, **kwargs)

        def setup(self, args, state, model):
            self._initialized = True
            if state.is_world_process_zero:  # resume: append to the curves restored from the checkpoint
                self.live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=resume)

    return [Callback()]

"""A callback for the scan benchmark: prints ``FIRST_STEP <unix time>`` at the first training
batch and ends the fit there."""

import time

import lightning as L


class PrintFirstStep(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        print(f"FIRST_STEP {time.time():.3f}", flush=True)
        trainer.should_stop = True

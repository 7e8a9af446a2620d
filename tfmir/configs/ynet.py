"""Paper 002's setting: Y-Net trained from scratch with the coupled circle + pixel-CE loss.

`ynet(setting)` on three settings:

- "tiny": a narrow Y-Net at 96 px (crops of 104 px images), 2 epochs of 2 steps (tests, seconds).
- "cpu": the paper's widths (b1..core 32/64/128/256, R-MAC 512, FPN 32) at 128 px (crops of
  144 px images; core node 4 x 4), 100 epochs of 5 batches of 32 (one pass over PH2's 160
  training images; 500 steps, against the paper's 500 epochs), sized so that
  `experiments/ynet_tables.py --config=cpu` (seven trainings on PH2) finishes on a 2-core CPU in
  under an hour (measured: 44 minutes, 217-462 s per training, on 2 AVX2 cores; details in that
  module's docstring).
- "paper": Sec. IV-B: 256 px input, batches of 32, SGD with momentum 0.9 and weight decay 1e-3,
  500 epochs, from scratch. Not in the paper, chosen here: the learning rate 0.01 (the paper does
  not give one), random crops of 272 px images with horizontal flips as augmentation, and
  epochs of one pass over the data set the experiment trains on (the config holds PH2's 9:1
  training share, 180 images: 6 batches).

Every setting evaluates mAP@10 of the 64-bit codes (Hamming ranking) and the Dice / IoU of the
FPN branch's masks on the validation split after each epoch and keeps the checkpoint of best
validation mAP@10. Keras' SGD applies weight decay decoupled (w -= lr * wd * w each step, outside
the momentum), where PyTorch's SGD, which the authors used, adds wd * w to the gradient.

Reference:
    Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance Retrieval",
    IEEE JBHI 2021, Sec. IV-B.
"""

from __future__ import annotations

from tfmir.configs.config import Config, DataConfig, OptimizerConfig, SamplerConfig, TaskConfig

SETTINGS = ("tiny", "cpu", "paper")

_RESIZE = {"tiny": 104, "cpu": 144, "paper": 272}
_SCHEDULES = {
    # (batch size, learning rate, epochs, steps per epoch)
    "tiny": (8, 0.01, 2, 2),
    "cpu": (32, 0.01, 100, 5),
    "paper": (32, 0.01, 500, 6),
}
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-3


def ynet(setting: str = "paper") -> Config:
    """Y-Net with the coupled loss (ω = 0.5 fixed), 64-bit codes."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}. Received: {setting!r}")
    from tfmir.models.ynet import PRESETS  # the model sizes live with the model

    batch_size, learning_rate, epochs, steps = _SCHEDULES[setting]
    return Config(
        task=TaskConfig(name="ynet", model=dict(PRESETS[setting]),
                        args={"classification_loss": "circle", "loss_weighting": "fixed",
                              "weight": 0.5, "num_bits": 64}),
        data=DataConfig(resize_size=_RESIZE[setting]),
        sampler=SamplerConfig(name="shuffled", batch_size=batch_size),
        optimizer=OptimizerConfig(name="sgd", learning_rate=learning_rate,
                                  args={"momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}),
        epochs=epochs, steps_per_epoch=steps,
        evaluators=[{"name": "map", "k": 10, "codes": True}, {"name": "segmentation"}],
        monitor="val_map@10", mode="max")

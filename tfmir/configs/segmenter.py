"""Paper 003's segmentation module: R2U-Net (or U-Net, RU-Net) with the focal Tversky loss.

Two configs, each on three settings ("tiny", "cpu", "paper"):

- `segmenter(setting)`: skin-lesion masks (PH2, `ph2/labels.csv`, mask column "mask"). The whole
  image is the input (resized to the model's side, random horizontal flips), as paper 003 does
  (Sec. 3.2: every image resized to 384 x 384).
- `segmenter_drive(setting)`: retinal vessels (DRIVE, `drive/index.csv`, mask column
  "vessel_mask"), trained on random square patches of the image resized to 576 x 576 (Alom et
  al.'s patch-based retina experiments). The segmenter itself is built at 576 and the task
  trains its layers on `patch_size` patches (`tfmir.tasks.Segmentation`), so validation Dice,
  `best.keras` and export are on the whole resized image; `tfmir.models.segment_tiled` predicts
  the original 565 x 584 image patch by patch instead. Dice covers the whole square, inside and
  outside DRIVE's field-of-view mask.

Every setting trains `tfmir.tasks.Segmentation` (focal Tversky alpha = 0.7, beta = 0.3,
exponent 0.75), evaluates Dice and IoU of the thresholded (0.5) masks on the validation split
after each epoch and keeps the checkpoint of best validation Dice. The variant is a model
argument: `--config.task.model.variant=unet` (or "runet") gives the other two architectures
paper 003 compared.

Settings:

- "tiny": R2U-Net at 32 px (depth 3, widths 8..64), 2 epochs of 2 steps (tests, seconds).
- "cpu": R2U-Net with depth 4 and widths 8..128 (`R2UNet` preset "cpu"), Adam at 1e-3, sized
  for about 5 minutes on 2 CPU cores: PH2 at 128 px, 12 epochs of 10 batches of 8; DRIVE on
  64 x 64 patches, 10 epochs of 20 batches of 16. Measured on 2 cores that another process
  half used: a training step takes about 1.7 s for 8 images at 128 px and 0.4 s for 16 patches
  at 64 px, a 576 x 576 validation image 0.6 s, and tracing the step 15-25 s once; a DRIVE batch
  also costs the pipeline about 0.55 s, since every patch is cut from its whole image resized
  (antialiased) from 565 x 584 to 576 x 576; 2 epochs of the earlier, larger schedules took 68 s
  (PH2, 10 steps each) and 130 s (DRIVE, 30 steps each). Not yet timed on real data.
- "paper": R2U-Net with Alom et al.'s widths 16..256 (depth 4, t = 2; preset "paper"). PH2 at
  paper 003's 384 px, batches of 8. DRIVE on Alom et al.'s 48 x 48 patches, batches of 32,
  epochs of 190,000 / 32 patches (Alom et al. draw 190,000 patches from the 20 training images).
  Neither paper gives the optimizer's settings used here: Adam at 1e-4, 100 epochs (PH2: epochs
  of 25 batches, about PH2's 200 images). Chosen here, not from the papers.

Reference:
    "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using Style
    Transfer, Semantic Image Segmentation and Ensemble Learning", Sec. 3.2 and 3.4; Alom et al.,
    "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for Medical Image
    Segmentation", https://arxiv.org/abs/1802.06955, Sec. IV; Abraham & Khan,
    https://arxiv.org/abs/1810.07842.
"""

from __future__ import annotations

from tfmir.configs.config import Config, DataConfig, OptimizerConfig, SamplerConfig, TaskConfig

SETTINGS = ("tiny", "cpu", "paper")
VARIANT = "r2unet"  # paper 003's choice over U-Net and RU-Net (Sec. 3.4)
LOSS = {"alpha": 0.7, "beta": 0.3, "gamma": 0.75}  # Abraham & Khan's focal Tversky

# PH2: (image_size, resize_size, batch size, learning rate, epochs, steps per epoch)
_LESION = {
    "tiny": (32, 36, 4, 1e-3, 2, 2),
    "cpu": (128, 128, 8, 1e-3, 12, 10),
    "paper": (384, 384, 8, 1e-4, 100, 25),
}
# DRIVE: (segmenter side = resize_size, patch_size, batch size, learning rate, epochs, steps)
_VESSELS = {
    "tiny": (64, 32, 4, 1e-3, 2, 2),
    "cpu": (576, 64, 16, 1e-3, 10, 20),
    "paper": (576, 48, 32, 1e-4, 100, 190_000 // 32),
}


def _check(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}. Received: {setting!r}")


def _config(setting, *, image_size, resize_size, batch_size, learning_rate, epochs, steps,
            patch_size=None) -> Config:
    from tfmir.models.r2unet import PRESETS  # the model sizes live with the model

    args = dict(LOSS) if patch_size is None else {"patch_size": patch_size, **LOSS}
    return Config(
        task=TaskConfig(name="segmentation",
                        model={**PRESETS[setting], "image_size": image_size, "variant": VARIANT},
                        args=args),
        data=DataConfig(resize_size=resize_size),
        sampler=SamplerConfig(name="shuffled", batch_size=batch_size),
        optimizer=OptimizerConfig(name="adam", learning_rate=learning_rate),
        epochs=epochs, steps_per_epoch=steps,
        evaluators=[{"name": "segmentation"}], monitor="val_dice", mode="max")


def segmenter(setting: str = "paper") -> Config:
    """R2U-Net for skin-lesion masks (PH2) with the focal Tversky loss; whole images."""
    _check(setting)
    image_size, resize_size, batch_size, learning_rate, epochs, steps = _LESION[setting]
    return _config(setting, image_size=image_size, resize_size=resize_size,
                   batch_size=batch_size, learning_rate=learning_rate, epochs=epochs, steps=steps)


def segmenter_drive(setting: str = "paper") -> Config:
    """R2U-Net for retinal vessels (DRIVE) trained on random patches of the 576 px image."""
    _check(setting)
    side, patch_size, batch_size, learning_rate, epochs, steps = _VESSELS[setting]
    return _config(setting, image_size=side, resize_size=side, batch_size=batch_size,
                   learning_rate=learning_rate, epochs=epochs, steps=steps,
                   patch_size=patch_size)

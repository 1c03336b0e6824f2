"""Image watermarking and its robustness, in plain PyTorch (no Ray).

- :mod:`vision.watermark.attacks`: what a watermarked image meets (JPEG, crops, blur...),
  on uint8 RGB arrays.
- :mod:`vision.watermark.noise`: the training noise layers (real and differentiable JPEG,
  JpegSS, JpegMask, crops, dropout, filters; ``Combined`` for MBRS's per-batch choice).
- :mod:`vision.watermark.mbrs`: MBRS's encoder, decoder and discriminator, its losses, and
  the HiDDeN-style baseline.
"""

"""Differential privacy: sensitivity from contribution bounds, OpenDP noise, accuracy, costs.

- :mod:`gateway.privacy.sensitivity`: per-measure sensitivity from a dataset's declared bounds.
- :mod:`gateway.privacy.noise`: noise planning (scale from spend), OpenDP measurements, accuracy.

Never generates noise with anything but OpenDP; never accumulates budget in floats.
"""

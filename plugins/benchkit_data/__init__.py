"""Datasets benchkit ships or can build offline.

`benchkit_data.digits`: scikit-learn's embedded 8x8 handwritten digits (1797 images, no download),
with a fixed train/test split; the small models of `benchkit_zoo` are trained and evaluated on it.
"""

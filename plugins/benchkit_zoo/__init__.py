"""benchkit's model zoo: small models trained by recipes in this package and shipped with it.

`nets` holds the architectures, `recipes` the deterministic training code, `catalog` the table
of shipped weights (file + sha256) and `load_zoo_model(name)`.
"""

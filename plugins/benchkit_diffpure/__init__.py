"""DiffPure (Nie et al., ICML 2022) as a benchkit plugin: VP-SDE purification and score models."""

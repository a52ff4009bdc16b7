"""AutoAttack (Croce & Hein 2020) through the pyautoattack package: versions standard and rand."""

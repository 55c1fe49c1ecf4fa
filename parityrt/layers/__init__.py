"""Numerics-aware building blocks. Each module that does numerically sensitive work declares `numerics_op`
and reads its settings from `self.nx`, which `parityrt.numerics.bind` sets once after loading."""

"""One file per op: the torch reference implementation (`*_ref`) and, where one exists, its Triton kernel.

Imports torch (and triton) only: settings arrive as plain arguments.
"""

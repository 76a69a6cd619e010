"""h1tune: fine-tune Falcon-H1 (hybrid attention + Mamba-2) correctly and fast.

Run `h1tune --help`. The package keeps heavy imports (torch, transformers) out of this file
so the CLI's `--help` and the config module stay instant.
"""

__version__ = "0.1.0"

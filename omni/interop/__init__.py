"""Other frameworks' checkpoints in and out of omni: `omni.interop.hf` for Hugging Face GPT-2.

Nothing is re-exported here: `python -m omni.interop.hf` would otherwise find the module already imported by
its package and runpy warns; import it as `from omni.interop import hf`.
"""

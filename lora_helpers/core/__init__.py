"""What every stage shares: model sources and the smoke switch (config), atomic file IO, image
loading, the machine (runtime), the run and dataset folders (run_folder), LoRA files (lora_files,
lora_check, lora_convert), labelled grids, and the tiny offline models.

Import the module you need (``from lora_helpers.core.run_folder import DEFAULT_TRIGGER``); this
package re-exports nothing, so importing one small module never loads the others.
"""

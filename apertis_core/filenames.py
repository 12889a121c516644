"""Names of the files and folders apertis_core writes that other programs look for (the studio, scripts).

A module of its own, importing nothing, so readers get the real names without importing torch.
"""

BUNDLE_FILES = ("model.safetensors", "config.json", "tokenizer.json")  # what every model folder holds
STOP_FILE = "STOP"  # in a run folder: asks the trainer to save a checkpoint and return
FINAL_DIR = "final"  # in a run folder: the bundle the trainer writes when the run reaches its end

"""The command line: ``lora-studio`` (window) and ``lora-studio inspect|compare|merge``."""

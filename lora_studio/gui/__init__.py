"""The PySide6 window over the headless core (``lora_studio.core``)."""

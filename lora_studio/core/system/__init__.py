"""The machine.

Live memory readings (process, system, GPUs through NVML, torch's allocator) and routing of cycle collection to one
thread.
"""

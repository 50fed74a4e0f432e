import multiprocessing

from lora_studio.cli.main import main

if __name__ == "__main__":
    # a frozen bundle starts its training worker by running itself: this line makes that run the worker
    multiprocessing.freeze_support()
    raise SystemExit(main())

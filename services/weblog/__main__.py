"""The weblog service: a worker for the stages registered with service="weblog"."""
from almapipe.platform.worker import main

if __name__ == "__main__":
    main("weblog")

"""The imager service: a worker for the stages registered with service="imager"."""
from almapipe.platform.worker import main

if __name__ == "__main__":
    main("imager")

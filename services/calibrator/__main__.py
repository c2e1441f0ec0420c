"""The calibrator service: a worker for the stages registered with service="calibrator"."""
from almapipe.platform.worker import main

if __name__ == "__main__":
    main("calibrator")

"""The imager service: a worker for the stages registered with service="imager"."""
from almapipe.imaging.clean_kernels import prefer_threadsafe_layer
from almapipe.platform.worker import main

if __name__ == "__main__":
    # before any kernel runs: makeimages makes two images at once in threads
    prefer_threadsafe_layer()
    main("imager")

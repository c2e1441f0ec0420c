"""The imager service: a worker for the stages registered with service="imager"."""

if __name__ == "__main__":
    # imported here, not above: a process this worker spawns (the drawing helper) imports
    # this module again, and needs none of the worker's modules (2 s of CPU each)
    from almapipe.imaging.clean_kernels import prefer_threadsafe_layer
    from almapipe.platform.worker import main
    # before any kernel runs: makeimages makes two images at once in threads
    prefer_threadsafe_layer()
    main("imager")

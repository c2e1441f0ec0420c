"""The importer service: a worker for the stages registered with service="importer"."""

if __name__ == "__main__":
    # imported here, not above: a process this worker spawns (importdata's ingest)
    # imports this module again, and needs none of the worker's modules (2 s of CPU each)
    from almapipe.platform.worker import main
    main("importer")

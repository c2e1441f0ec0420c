"""The importer service: a worker for the stages registered with service="importer"."""
from almapipe.platform.worker import main

if __name__ == "__main__":
    main("importer")

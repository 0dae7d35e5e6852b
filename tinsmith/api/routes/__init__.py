"""One FastAPI router per resource; each handler validates, calls the service, answers."""

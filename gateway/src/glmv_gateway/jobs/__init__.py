"""Batch jobs: a recorded call or a text script in, reply audio + transcript out, run by Celery workers
through the same turn pipeline and gRPC services as live turns."""

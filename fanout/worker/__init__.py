"""What runs inside a worker process or a Ray actor, and the warden that parents a worker."""

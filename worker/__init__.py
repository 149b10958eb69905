"""RQ side of the service: the job function and the HTTP client for the inference engine."""

"""The long-lived inference engine: builds the vLLM command line from settings and supervises it."""

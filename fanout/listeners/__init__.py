"""The listener kinds (process, thread, Ray), what their lanes share, and the supervisor."""

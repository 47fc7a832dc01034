"""`pykvshm demo` on real vLLM engines: a driver here, engines in the vLLM environment."""

"""Process settings of the fast CPU path, importable without loading torch."""

# Process settings of the fast path, for the environment of a process that has not loaded torch
# yet (libgomp reads them once). OpenMP worker threads spin 300,000 times between parallel
# regions by default; on a CPU shared with other jobs a spinning thread spends its time slice,
# gets descheduled, and every parallel op then waits a scheduler tick (~10 ms) for it. A short
# spin still bridges the microseconds between consecutive ops of one step.
RUNTIME_ENV = {"GOMP_SPINCOUNT": "10000"}

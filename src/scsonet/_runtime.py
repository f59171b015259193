"""Process settings of the fast CPU path, importable without loading torch."""

# Process settings of the fast path, for the environment of a process that has not loaded torch
# yet (libgomp reads them once). OpenMP worker threads spin 300,000 times between parallel
# regions by default; on a CPU shared with other jobs a spinning thread spends its time slice,
# gets descheduled, and every parallel op then waits a scheduler tick (~10 ms) for it. A short
# spin still bridges most of the gaps between consecutive ops of one step. Measured on 2 shared
# cores (benchmarks/train_speed.py): 1,000 spins cost ~12% against 10,000 on an idle machine but
# stay 2-7x faster than the plain run under load, where 10,000 fell to 0.6x; sleeping at once
# (OMP_WAIT_POLICY=PASSIVE) is robust under load but slower than plain on an idle machine.
RUNTIME_ENV = {"GOMP_SPINCOUNT": "1000"}

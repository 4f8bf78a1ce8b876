"""Running a suite: the shared per-process state (context), what a method needs before training (prepare), the
measurements (measure), one function per kind of run (kinds), a multitask group's student (group), and the suite
loop (runner), in that order of dependence.
"""

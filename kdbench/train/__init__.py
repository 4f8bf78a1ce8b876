"""Training: the Distiller (a Trainer whose loss is the method's), the teacher caches, the loop and multi-task KD.

Importing it imports torch and transformers; kdbench's top level and CLI import it only when they train.
"""

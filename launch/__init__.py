"""`python -m launch`: turn one training config into a torchrun, deepspeed or sbatch launch.

Thin by design: it validates the config with the trainer's schema, renders a command or a
job script, and runs or submits it. It holds no training logic and never imports train.loop.
"""

"""Parameter-efficient fine-tuning: `adapter=lora|qlora` trains peft adapters on a frozen base.

The settings (config.py) are torch-free so the schema loads quickly; applying the adapter and
fingerprinting the base live in lora.py, imported only by the trainer.
"""

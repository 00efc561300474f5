"""TRC kit: create, set up, launch on and delete Cloud TPU VMs and pod slices; mesh presets; scaling plan.

Standard library only, so it runs on a laptop that has `gcloud` but not the project's dependencies.
"""

"""Gaussian diffusion models: the process (schedules, respacing, samplers), timestep samplers and the UNet."""

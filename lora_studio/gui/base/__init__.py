"""What every part of the window builds on: the panel base, the typed op helper and the job runner, the session
model, the tab context, the store of models loaded beside the session, settings, and shared widgets."""

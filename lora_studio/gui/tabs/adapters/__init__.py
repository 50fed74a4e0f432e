"""The Adapters tab: the attached adapters, the inspector of the selected one, and Try it."""

"""The main window: it assembles the docks and the registry's tabs, owns the menus, the status bar, drag and drop
and the help dialogs, and carries out the cross-tab actions of the tab context's navigator."""

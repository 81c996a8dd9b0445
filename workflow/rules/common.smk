# Shared helpers for the rules.


def section(*names):
    """The params sections a rule depends on, so that changing them reruns the rule."""
    return {name: config[name] for name in names}

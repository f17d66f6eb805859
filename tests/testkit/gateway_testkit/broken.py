"""A driver plugin whose import fails, as a plugin with a missing dependency would."""

import gateway_testkit_missing_dependency  # noqa: F401  (the point of this module)

BrokenDriver = None

"""Errors that mean "the user's input is wrong": the CLI prints them as one line and exits 2."""


class UserInputError(ValueError):
  """Bad input from the user (a flag, a data folder, a weight file); the message names it."""


class ConfigError(UserInputError):
  """A configuration value that cannot run; the message names the flag."""

"""Tests of the Feishu plugin: emulator, driver and the lark-oapi oracle."""

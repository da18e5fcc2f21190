"""Where ranks listen: the user's coordinator address, checked; loopback on one host; the route
to the other hosts otherwise (no root needed here; tests/test_hosts.py runs real hosts)."""

import pytest

from dinb.job import addresses
from dinb.job.addresses import AddressError
from dinb.runtime.config import load_config


@pytest.mark.parametrize("text, error", [
    ("0.0.0.0:1234", "not a wildcard"),
    ("*", "not a wildcard"),
    ("10.0.0.1:0", "the port must be a number from 1 to 65535"),
    ("10.0.0.1:http", "the port must be a number from 1 to 65535"),
    ("no-such-host.invalid", "does not resolve on this machine"),
])
def test_a_bad_coordinator_address_is_named_with_where_it_came_from(text, error):
    with pytest.raises(AddressError, match="--coordinator-address") as e:
        addresses.split_address(text, "--coordinator-address")
    assert error in str(e.value)


def test_an_address_with_and_without_a_port():
    assert addresses.split_address("127.0.0.1:4000", "x") == ("127.0.0.1", 4000)
    assert addresses.split_address("localhost", "x") == ("127.0.0.1", None)


def test_the_option_comes_before_the_environment_before_the_config(monkeypatch):
    monkeypatch.delenv(addresses.ENV_COORDINATOR, raising=False)
    assert addresses.coordinator_choice(None, None) is None
    assert addresses.coordinator_choice(None, "10.0.0.3") == ("10.0.0.3", "config coordinator_address")
    monkeypatch.setenv(addresses.ENV_COORDINATOR, "10.0.0.2")
    assert addresses.coordinator_choice(None, "10.0.0.3") == ("10.0.0.2", addresses.ENV_COORDINATOR)
    assert addresses.coordinator_choice("10.0.0.1", "10.0.0.3") == ("10.0.0.1", "--coordinator-address")


def test_the_config_key_is_checked_when_the_file_is_read(tmp_path):
    good, bad = tmp_path / "good.ini", tmp_path / "bad.ini"
    good.write_text("[runtime]\ncoordinator_address = 127.0.0.1:5000\n")
    bad.write_text("[runtime]\ncoordinator_address = 0.0.0.0\n")
    assert load_config(good).coordinator_address == "127.0.0.1:5000"
    with pytest.raises(AddressError, match=f"config file {bad}: coordinator_address"):
        load_config(bad)


def test_one_host_stays_on_loopback():
    assert addresses.own_address("127.0.0.1") == "127.0.0.1"
    assert addresses.free_port() > 0
    with pytest.raises(AddressError, match="cannot listen on 192.0.2.7"):
        addresses.free_port("192.0.2.7")  # an address this host does not have


def test_an_address_every_host_has_says_nothing_about_the_route(monkeypatch):
    """A docker bridge's 172.17.0.1 exists on every host: routing to it stays on this host."""
    routes = {"172.17.0.1": "172.17.0.1", "10.1.0.2": "10.1.0.1", "10.1.0.3": "10.1.0.1"}
    monkeypatch.setattr(addresses, "route_source", routes.get)
    mine = ["172.17.0.1", "10.1.0.1"]
    assert addresses.pick_reachable(mine, [["172.17.0.1", "10.1.0.2"], ["10.1.0.3"]]) == "10.1.0.1"
    with pytest.raises(AddressError, match="no route from rank 0's addresses"):
        addresses.pick_reachable(mine, [["172.17.0.1"]])


def test_this_hosts_addresses_leave_out_loopback():
    assert all(not addresses.is_loopback(a) for a in addresses.local_addresses())
    assert addresses.host_key() == addresses.host_key()

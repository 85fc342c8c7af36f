"""The ``aws-ec2`` dialect and its strict Query reader (CONTRACT §9).

Fixtures are the real requests of shared/reference/launch_apis.md; each names its source.
Unit tests read requests directly; end-to-end tests go through the gateway to the stub,
and the bypass corpus (reference §7) checks that nothing reaches the upstream for a
restricted account.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from conftest import (
    CPU_SKU,
    H100_SKU,
    RESTRICTED,
    UNRESTRICTED,
    MakeToken,
    StartGateway,
)
from launchgate.dialects import EVERY_METHOD, Item, LaunchRequest
from launchgate.dialects.aws_ec2 import AwsEc2, _launch_actions_in, build
from launchgate.dialects.query import encode_params, nest, parse_pairs, parse_params
from launchgate.errors import ConfigError
from launchgate.strict import MalformedLaunch

FORM = "application/x-www-form-urlencoded; charset=utf-8"
EC2 = build({}, "routes[0]")
ROUTE = {"dialect": "aws-ec2"}
P5_8 = "InstanceType=p5.48xlarge&MinCount=8&MaxCount=8&ImageId=ami-12345678"


def request(
    body: str = "",
    query: str = "",
    *,
    method: str = "POST",
    host: str = "ec2.us-east-1.amazonaws.com",
    content_type: str | None = FORM,
    path: str = "/",
    **headers: str,
) -> LaunchRequest:
    h: CIMultiDict[str] = CIMultiDict(Host=host)
    if content_type is not None and method == "POST":
        h["Content-Type"] = content_type
    h.update(headers)
    return LaunchRequest(method, path, query, CIMultiDictProxy(h), body.encode())


def items(*pairs: tuple[str, int]) -> tuple[Item, ...]:
    return tuple(Item(sku, count) for sku, count in pairs)


# (id, body, items, unresolvable fragment or None); every request has Host ec2.us-east-1…
READS = [
    # launch_apis.md §1.1, realistic SDK POST adapted from API_RunInstances.html
    (
        "run-instances-post",
        "Action=RunInstances&Version=2016-11-15&ClientToken=550e8400-e29b-41d4-a716-446655440000"
        "&ImageId=ami-60a54009&InstanceType=p4d.24xlarge&MinCount=1&MaxCount=3"
        "&KeyName=my-key-pair&Placement.AvailabilityZone=us-east-1d&SubnetId=subnet-b2a249da",
        items(("p4d.24xlarge", 3)),
        None,
    ),
    # https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_RunInstances.html (example 2)
    (
        "run-instances-doc",
        "Action=RunInstances&ImageId=ami-31814f58&InstanceType=m1.small&MaxCount=1&MinCount=1"
        "&KeyName=my-key-pair&SubnetId=subnet-b2a249da",
        items(("m1.small", 1)),
        None,
    ),
    # same page, example 1: no InstanceType at all, the service default applies
    (
        "run-instances-default-type",
        "Action=RunInstances&ImageId=ami-60a54009&MaxCount=3&MinCount=1&KeyName=my-key-pair"
        "&Placement.AvailabilityZone=us-east-1d",
        (),
        "names no InstanceType",
    ),
    # launch_apis.md §1.1 launch-template variant (RunInstancesRequestMarshaller.cs)
    (
        "run-instances-template",
        "Action=RunInstances&Version=2016-11-15&LaunchTemplate.LaunchTemplateId=lt-0a20c965061f64abc"
        "&LaunchTemplate.Version=%24Latest&MinCount=1&MaxCount=1",
        (),
        "launch template",
    ),
    # a request-level InstanceType overrides the template's (same section)
    (
        "run-instances-template-with-type",
        "Action=RunInstances&LaunchTemplate.LaunchTemplateName=train&InstanceType=p5.48xlarge"
        "&MinCount=2&MaxCount=2",
        items(("p5.48xlarge", 2)),
        None,
    ),
    # §7 item 15: MaxCount is the exposure, but MinCount above it still counts
    (
        "min-above-max",
        "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=5&MaxCount=1",
        items(("p5.48xlarge", 5)),
        None,
    ),
    # §7 item 13: deprecated accelerator attachments are items of their own
    (
        "elastic-inference",
        "Action=RunInstances&InstanceType=m7i.large&MinCount=1&MaxCount=2"
        "&ElasticInferenceAccelerator.1.Type=eia2.xlarge&ElasticInferenceAccelerator.1.Count=3"
        "&ElasticGpuSpecification.1.Type=eg1.2xlarge",
        items(("m7i.large", 2), ("eg1.2xlarge", 2), ("eia2.xlarge", 6)),
        None,
    ),
    # https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_CreateLaunchTemplate.html
    (
        "create-launch-template-doc",
        "Action=CreateLaunchTemplate&LaunchTemplateName=MyLaunchTemplate"
        "&VersionDescription=FirstVersion&LaunchTemplateData.ImageId=ami-1a2b3c4d"
        "&LaunchTemplateData.InstanceType=t2.micro",
        items(("t2.micro", 0)),
        None,
    ),
    # launch_apis.md §1.2, attribute-based variant (CreateLaunchTemplateRequestMarshaller.cs)
    (
        "launch-template-version-requirements",
        "Action=CreateLaunchTemplateVersion&Version=2016-11-15&LaunchTemplateId=lt-0a20c965061f64abc"
        "&SourceVersion=1&LaunchTemplateData.InstanceRequirements.VCpuCount.Min=4"
        "&LaunchTemplateData.InstanceRequirements.MemoryMiB.Min=16384"
        "&LaunchTemplateData.InstanceRequirements.AcceleratorCount.Min=1"
        "&LaunchTemplateData.InstanceRequirements.AcceleratorType.1=gpu"
        "&LaunchTemplateData.InstanceRequirements.AcceleratorManufacturer.1=nvidia",
        (),
        "InstanceRequirements",
    ),
    # §7 item 26: the .NET SDK's empty-list marker still selects by requirements
    (
        "requirements-empty-list-marker",
        "Action=CreateLaunchTemplate&LaunchTemplateName=x"
        "&LaunchTemplateData.InstanceRequirements.AcceleratorType=",
        (),
        "InstanceRequirements",
    ),
    # launch_apis.md §1.3 (CreateFleetRequestMarshaller.cs; emulator tests)
    (
        "create-fleet",
        "Action=CreateFleet&Version=2016-11-15&Type=instant"
        "&LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId=lt-0e8c754449b27161c"
        "&LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version=1"
        "&LaunchTemplateConfigs.1.Overrides.1.InstanceType=g5.xlarge"
        "&LaunchTemplateConfigs.1.Overrides.1.AvailabilityZone=us-east-1a"
        "&LaunchTemplateConfigs.1.Overrides.1.WeightedCapacity=1"
        "&LaunchTemplateConfigs.1.Overrides.2.InstanceType=p4d.24xlarge"
        "&LaunchTemplateConfigs.1.Overrides.2.WeightedCapacity=8"
        "&TargetCapacitySpecification.TotalTargetCapacity=16"
        "&TargetCapacitySpecification.DefaultTargetCapacityType=spot",
        items(("g5.xlarge", 16), ("p4d.24xlarge", 16)),
        None,
    ),
    # §7 item 16: a weight below 1 launches more instances than the target
    (
        "fleet-fractional-weight",
        "Action=CreateFleet&LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge"
        "&LaunchTemplateConfigs.1.Overrides.1.WeightedCapacity=0.25"
        "&TargetCapacitySpecification.TotalTargetCapacity=3",
        items(("p5.48xlarge", 12)),
        None,
    ),
    # found by QA: on-demand and Spot parts above the total count as their sum, the most the
    # request could launch were they not held to the total
    (
        "fleet-parts-over-total",
        "Action=CreateFleet&LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge"
        "&TargetCapacitySpecification.TotalTargetCapacity=3"
        "&TargetCapacitySpecification.OnDemandTargetCapacity=2"
        "&TargetCapacitySpecification.SpotTargetCapacity=2",
        items(("p5.48xlarge", 4)),
        None,
    ),
    # §7 item 16: capacity in vCPUs cannot be turned into instances
    (
        "fleet-vcpu-units",
        "Action=CreateFleet&LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge"
        "&TargetCapacitySpecification.TotalTargetCapacity=192"
        "&TargetCapacitySpecification.TargetCapacityUnitType=vcpu",
        items(("p5.48xlarge", 192)),
        "units",
    ),
    # §7 items 1-3: a fleet config without overrides takes the template's type
    (
        "fleet-template-only",
        "Action=CreateFleet&LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateName=gpu"
        "&LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version=%24Default"
        "&TargetCapacitySpecification.TotalTargetCapacity=4",
        (),
        "launch template",
    ),
    # §7 item 2: attribute-based override beside a typed one
    (
        "fleet-requirements-override",
        "Action=CreateFleet&LaunchTemplateConfigs.1.Overrides.1.InstanceType=m7i.large"
        "&LaunchTemplateConfigs.1.Overrides.2.InstanceRequirements.AcceleratorCount.Min=1"
        "&TargetCapacitySpecification.TotalTargetCapacity=2",
        items(("m7i.large", 2)),
        "InstanceRequirements",
    ),
    # a maintain fleet created empty launches nothing yet but names its types
    (
        "fleet-zero-capacity",
        "Action=CreateFleet&Type=maintain&LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge"
        "&TargetCapacitySpecification.TotalTargetCapacity=0",
        items(("p5.48xlarge", 0)),
        None,
    ),
    # apache/jclouds AWSEC2ComputeServiceApiMockTest.java, as quoted in launch_apis.md §1.4
    (
        "spot-instances-jclouds",
        "Action=RequestSpotInstances&SpotPrice=1.0&InstanceCount=1"
        "&LaunchSpecification.ImageId=ami-be3adfd7"
        "&LaunchSpecification.Placement.AvailabilityZone=us-east-1a"
        "&LaunchSpecification.InstanceType=m3.medium&LaunchSpecification.SubnetId=subnet-xyz"
        "&LaunchSpecification.KeyName=Demo"
        "&LaunchSpecification.UserData=I2Nsb3VkLWNvbmZpZwpyZXBvX3VwZ3JhZGU6IG5vbmUK",
        items(("m3.medium", 1)),
        None,
    ),
    # launch_apis.md §1.4 realistic request (API_RequestSpotInstances.html)
    (
        "spot-instances",
        "Action=RequestSpotInstances&Version=2016-11-15&InstanceCount=5&Type=one-time"
        "&LaunchSpecification.ImageId=ami-1a2b3c4d&LaunchSpecification.InstanceType=g6.12xlarge"
        "&LaunchSpecification.Placement.AvailabilityZone=us-east-1a",
        items(("g6.12xlarge", 5)),
        None,
    ),
    # InstanceCount defaults to 1
    (
        "spot-instances-default-count",
        "Action=RequestSpotInstances&LaunchSpecification.InstanceType=p5.48xlarge",
        items(("p5.48xlarge", 1)),
        None,
    ),
    # https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_RequestSpotFleet.html
    (
        "spot-fleet-doc",
        "Action=RequestSpotFleet"
        "&SpotFleetRequestConfig.IamFleetRole=arn:aws:iam::123456789011:role/spot-fleet-role"
        "&SpotFleetRequestConfig.TargetCapacity=5"
        "&SpotFleetRequestConfig.LaunchSpecifications.1.ImageId=ami-1ecae776"
        "&SpotFleetRequestConfig.LaunchSpecifications.1.InstanceType=m4.large"
        "&SpotFleetRequestConfig.LaunchSpecifications.1.SubnetId=subnet-1a2b3c4d"
        "&SpotFleetRequestConfig.LaunchSpecifications.2.ImageId=ami-1ecae776"
        "&SpotFleetRequestConfig.LaunchSpecifications.2.InstanceType=m3.medium"
        "&SpotFleetRequestConfig.LaunchSpecifications.2.SubnetId=subnet-1a2b3c4d",
        items(("m4.large", 5), ("m3.medium", 5)),
        None,
    ),
    # launch_apis.md §1.5: template overrides in a spot fleet
    (
        "spot-fleet-template-overrides",
        "Action=RequestSpotFleet&SpotFleetRequestConfig.TargetCapacity=2"
        "&SpotFleetRequestConfig.OnDemandTargetCapacity=4"
        "&SpotFleetRequestConfig.LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId=lt-1"
        "&SpotFleetRequestConfig.LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge",
        items(("p5.48xlarge", 4)),
        None,
    ),
    # launch_apis.md §1.5 follow-up (getmoto/moto spot_fleets.py wire names)
    (
        "modify-spot-fleet",
        "Action=ModifySpotFleetRequest&SpotFleetRequestId=sfr-123f8fc2&TargetCapacity=20",
        (),
        "fleet by id",
    ),
    # launch_apis.md §1.3 follow-up
    (
        "modify-fleet",
        "Action=ModifyFleet&FleetId=fleet-1&TargetCapacitySpecification.TotalTargetCapacity=40",
        (),
        "fleet by id",
    ),
    # launch_apis.md §1.7 (ApiReference-query-ModifyInstanceAttribute.html)
    (
        "modify-instance-type",
        "Action=ModifyInstanceAttribute&InstanceId=i-1234567890abcdef0"
        "&InstanceType.Value=p4d.24xlarge",
        items(("p4d.24xlarge", 1)),
        None,
    ),
    (
        "modify-instance-attribute-form",
        "Action=ModifyInstanceAttribute&InstanceId=i-1&Attribute=instanceType&Value=p5.48xlarge",
        items(("p5.48xlarge", 1)),
        None,
    ),
    # launch_apis.md §1.8 table
    (
        "capacity-reservation",
        "Action=CreateCapacityReservation&InstanceType=p5.48xlarge&InstanceCount=2"
        "&InstancePlatform=Linux%2FUNIX&AvailabilityZone=us-east-1a",
        items(("p5.48xlarge", 2)),
        None,
    ),
    (
        "allocate-hosts",
        "Action=AllocateHosts&InstanceType=p5.48xlarge&Quantity=1&AvailabilityZone=us-east-1a",
        (),
        "dedicated hosts",
    ),
    (
        "capacity-block",
        "Action=PurchaseCapacityBlock&CapacityBlockOfferingId=cbo-1&InstancePlatform=Linux%2FUNIX",
        (),
        "capacity block",
    ),
    # launch_apis.md §1.6 (Auto Scaling query form, AWS SDK marshallers): never readable here
    (
        "auto-scaling-group",
        "Action=CreateAutoScalingGroup&Version=2011-01-01&AutoScalingGroupName=gpu-asg&MinSize=0"
        "&MaxSize=64&DesiredCapacity=8&VPCZoneIdentifier=subnet-057fa0918fEXAMPLE%2Csubnet-610acd08EXAMPLE"
        "&MixedInstancesPolicy.LaunchTemplate.LaunchTemplateSpecification.LaunchTemplateId=lt-0123456789"
        "&MixedInstancesPolicy.LaunchTemplate.LaunchTemplateSpecification.Version=%24Latest"
        "&MixedInstancesPolicy.LaunchTemplate.Overrides.member.1.InstanceType=g5.2xlarge",
        (),
        "Auto Scaling",
    ),
    # Spot replacements on a rebalance signal run beyond the target (found in review; AWS
    # FleetSpotCapacityRebalanceRequest: with "launch" the old instances are not terminated)
    (
        "fleet-capacity-rebalance",
        "Action=CreateFleet&Type=maintain&TargetCapacitySpecification.TotalTargetCapacity=1"
        "&TargetCapacitySpecification.DefaultTargetCapacityType=spot"
        "&LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId=lt-1"
        "&LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge"
        "&SpotOptions.MaintenanceStrategies.CapacityRebalance.ReplacementStrategy=launch",
        items(("p5.48xlarge", 1)),
        "ReplacementStrategy",
    ),
    (
        "spot-fleet-capacity-rebalance",
        "Action=RequestSpotFleet&SpotFleetRequestConfig.TargetCapacity=2"
        "&SpotFleetRequestConfig.LaunchSpecifications.1.InstanceType=p5.48xlarge"
        "&SpotFleetRequestConfig.SpotMaintenanceStrategies.CapacityRebalance"
        ".ReplacementStrategy=launch-before-terminate"
        "&SpotFleetRequestConfig.SpotMaintenanceStrategies.CapacityRebalance.TerminationDelay=120",
        items(("p5.48xlarge", 2)),
        "ReplacementStrategy",
    ),
    (
        "fleet-spot-options-without-rebalance",
        "Action=CreateFleet&TargetCapacitySpecification.TotalTargetCapacity=3"
        "&LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge"
        "&SpotOptions.AllocationStrategy=price-capacity-optimized",
        items(("p5.48xlarge", 3)),
        None,
    ),
    # reference §1.6: PutScalingPolicy moves group capacity too
    (
        "auto-scaling-policy",
        "Action=PutScalingPolicy&AutoScalingGroupName=gpu-asg&PolicyName=up"
        "&PolicyType=SimpleScaling&AdjustmentType=ChangeInCapacity&ScalingAdjustment=8",
        (),
        "Auto Scaling",
    ),
    # A rollback replaces the group's instances by its previous configuration, as a refresh does
    (
        "auto-scaling-refresh-rollback",
        "Action=RollbackInstanceRefresh&AutoScalingGroupName=gpu-asg",
        (),
        "Auto Scaling",
    ),
    # Taken out of a group without lowering its capacity: the group launches as many again
    (
        "auto-scaling-detach-keeping-capacity",
        "Action=DetachInstances&AutoScalingGroupName=gpu-asg&InstanceIds.member.1=i-1"
        "&ShouldDecrementDesiredCapacity=false",
        (),
        "DetachInstances",
    ),
    (
        "auto-scaling-standby-keeping-capacity",
        "Action=EnterStandby&AutoScalingGroupName=gpu-asg&InstanceIds.member.1=i-1",
        (),
        "EnterStandby",
    ),
    # §7 item 29: a dry run is judged like the launch it imitates
    (
        "dry-run",
        "Action=RunInstances&DryRun=true&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1",
        items(("p5.48xlarge", 1)),
        None,
    ),
    # §7 item 24: names and values are percent-decoded once, then matched
    (
        "encoded-names",
        "Action=Run%49nstances&Instance%54ype=p5%2E48xlarge&MinCount=1&MaxCount=%32",
        items(("p5.48xlarge", 2)),
        None,
    ),
    # §7 item 26: every index is read, gaps and a zero index included
    (
        "list-gaps-and-zero",
        "Action=CreateFleet&LaunchTemplateConfigs.0.Overrides.7.InstanceType=p5.48xlarge"
        "&LaunchTemplateConfigs.3.Overrides.1.InstanceType=m7i.large"
        "&TargetCapacitySpecification.TotalTargetCapacity=1",
        items(("p5.48xlarge", 1), ("m7i.large", 1)),
        None,
    ),
    # §7 item 15: leading zeros are one number
    (
        "count-leading-zeros",
        "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=0003",
        items(("p5.48xlarge", 3)),
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "expected", "unresolvable"),
    [pytest.param(b, i, u, id=name) for name, b, i, u in READS],
)
def test_reads_real_requests(
    body: str, expected: tuple[Item, ...], unresolvable: str | None
) -> None:
    """Each real request reads as the CONTRACT §9 items, unresolvable where it cannot tell."""
    launch = EC2.parse(request(body))
    assert launch is not None
    assert launch.items == expected
    assert launch.region == "us-east-1"
    if unresolvable is None:
        assert launch.unresolvable is None
    else:
        assert launch.unresolvable is not None and unresolvable in launch.unresolvable


@pytest.mark.parametrize(
    "body",
    [
        "Action=DescribeInstances&Filter.1.Name=instance-type&Filter.1.Value.1=p5.48xlarge",
        # §7 item 7: restarting an instance names no type; it was judged when launched
        "Action=StartInstances&InstanceId.1=i-1234567890abcdef0",
        "Action=ModifyInstanceAttribute&InstanceId=i-1&Attribute=userData&Value=ZWNobw%3D%3D",
        "Action=ModifyLaunchTemplate&LaunchTemplateId=lt-1&DefaultVersion=2",
        "Action=CreateLaunchTemplateVersion&LaunchTemplateId=lt-1&SourceVersion=1",
        "",
        # the group's capacity goes down with the instances taken out
        "Action=DetachInstances&AutoScalingGroupName=g&InstanceIds.member.1=i-1"
        "&ShouldDecrementDesiredCapacity=true",
    ],
    ids=[
        "describe",
        "start",
        "modify-user-data",
        "default-version",
        "copy-version",
        "empty",
        "detach-decrementing",
    ],
)
def test_actions_that_launch_nothing_are_not_launches(body: str) -> None:
    """An Action that cannot launch (or no parameters at all) is no launch: parse gives None."""
    assert EC2.parse(request(body)) is None


def test_values_and_cookies_that_name_no_parameter_leave_a_launch_alone() -> None:
    """Found in review of a value-based reading: a tag valued RunInstances, or a session cookie,
    made ordinary calls 400. Only a parameter read as Action, or a cookie named as a judged
    parameter, gives a second meaning."""
    body = (
        "Action=RunInstances&InstanceType=m7i.large&MinCount=1&MaxCount=1"
        "&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=CreatedBy"
        "&TagSpecification.1.Tag.1.Value=RunInstances"
    )
    launch = EC2.parse(request(body, Cookie="session=abc; last_op=run_instances"))
    assert launch is not None and launch.items == items(("m7i.large", 1))


@pytest.mark.parametrize("name", ["Act\u0131on", "ACT\u0130ON"])
def test_a_raw_utf8_action_name_in_a_form_body_is_read(name: str) -> None:
    """Found in review: the body was read as Latin-1, so a raw dotless i (which .NET folds to
    I) never folded to "action", and another route's request carrying it went on unjudged."""
    body = f"{name}=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=8"
    assert EC2.launch_action(request(body)) == "RunInstances"


@pytest.mark.parametrize(
    ("method", "query"),
    [
        ("GET", "api-version=2024-07-01"),  # an ARM read beside EC2 on "/" (found by QA: 400)
        ("GET", "maxResults=5&filter=status%3DRUNNING"),  # a Compute Engine list
        ("GET", "fields=a&fields=b"),  # repeated, as Google's APIs repeat them
        ("GET", "InstanceType=p5.48xlarge&MinCount=1&MaxCount=8"),  # EC2 answers MissingAction
        ("GET", "Action&InstanceType=p5.48xlarge"),  # an Action without a value names none
        ("DELETE", "api-version=2024-07-01"),
        ("HEAD", "limit=10"),
        ("POST", "api-version=2024-07-01"),  # no body
    ],
)
def test_a_bodiless_request_naming_no_action_is_no_ec2_call(method: str, query: str) -> None:
    """A request with no body that names no Action in any way an upstream reads one (query,
    cookies, ``X-Amz-Target``, a path segment) is not an EC2 call: parse gives None, and it
    goes on unjudged, however its query would read strictly."""
    for path in ("/", "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/vm"):
        assert EC2.parse(request(query=query, method=method, path=path)) is None


@pytest.mark.parametrize(
    ("query", "options"),
    [
        # named as frameworks read Action (found in review: each launched, where it was read)
        (f"%5BAction%5D=RunInstances&{P5_8}", {}),
        (f"Action%5B%5D=RunInstances&{P5_8}", {}),
        (f"Action%5D=RunInstances&{P5_8}", {}),
        (f"{'+' * 600}Action=RunInstances&{P5_8}", {}),
        (f"Action%00xyz=RunInstances&{P5_8}", {}),
        (f"action=runinstances&{P5_8}", {}),
        (f"%u0041ction=RunInstances&{P5_8}", {}),
        (f"%2541ction=RunInstances&{P5_8}", {}),
        # whatever the value: a parameter read as Action keeps the request an EC2 call
        ("%5BAction%5D=DescribeInstances", {}),
        (P5_8, {"Cookie": "Action=RunInstances"}),
        (P5_8, {"Cookie": "%5BAction%5D=DescribeInstances"}),
        # dotted prefixes: qs with allowDots, ASP.NET model binding (found in review)
        (f"request.Action=RunInstances&{P5_8}", {}),
        (f"%5B0%5D.Action=RunInstances&{P5_8}", {}),
        (f"a.b.Action=RunInstances&{P5_8}", {}),
        (f"req%252EAction=RunInstances&{P5_8}", {}),
        # moto's server takes the operation from X-Amz-Target when no Action names one, and
        # gunicorn hands it "X_Amz_Target" as that (found in review: 8 p5.48xlarge on moto)
        (P5_8, {"X-Amz-Target": "AmazonEC2.RunInstances"}),
        (P5_8, {"X-Amz-Target": "AmazonEC2.DescribeInstances"}),
        (P5_8, {"X_Amz_Target": "AmazonEC2.RunInstances"}),
        (P5_8, {"x_amz_target": "AmazonEC2.DescribeInstances"}),
        # an upstream that routes operations by path, cutting ";params" (Jetty, Tomcat) or a
        # format (Rails, Spring) (found in review: Jetty launched on "/RunInstances;x=1")
        (P5_8, {"path": "/RunInstances"}),
        (P5_8, {"path": "/ec2/run_instances"}),
        (P5_8, {"path": "/RunInstances;x=1"}),
        (P5_8, {"path": "/RunInstances.json"}),
        (P5_8, {"path": "/ec2/Run%49nstances;a"}),
        (P5_8, {"path": "/index.php/run_instances.xml"}),
    ],
)
def test_a_bodiless_request_naming_an_action_anyhow_is_read_strictly(
    query: str, options: dict[str, str]
) -> None:
    """What an upstream could read as an Action keeps a bodiless request an EC2 call, read
    strictly: with no exact Action it is malformed, as before."""
    path = options.pop("path", "/")
    with pytest.raises(MalformedLaunch):
        EC2.parse(request(query=query, method="GET", path=path, **options))


def test_x_amz_target_naming_a_launch_is_a_second_meaning() -> None:
    """Another route's request with an ``X-Amz-Target`` naming a launch Action reads as that
    launch to an upstream on a generic AWS framework (moto takes it when no Action names one)."""
    target = {"X-Amz-Target": "AmazonEC2.RunInstances"}
    assert EC2.launch_action(request(query=P5_8, method="GET", **target)) == "RunInstances"
    plain = {"X-Amz-Target": "AmazonEC2.DescribeInstances"}
    assert EC2.launch_action(request(query=P5_8, method="GET", **plain)) is None
    cgi = {"X_AMZ_TARGET": "AmazonEC2.CreateFleet"}  # as gunicorn reads it (found in review)
    assert EC2.launch_action(request(query=P5_8, method="GET", **cgi)) == "CreateFleet"
    launch = f"Action=RunInstances&{P5_8}"
    with pytest.raises(MalformedLaunch, match="X-Amz-Target"):
        EC2.parse(request(query=launch, method="GET", **target))


def test_get_query_is_read_like_a_form_body() -> None:
    """GET /?Action=… reads the query string, as the API reference examples do."""
    query = (
        "Action=RunInstances&ImageId=ami-31814f58&InstanceType=p5.48xlarge&MaxCount=2&MinCount=1"
    )
    launch = EC2.parse(request(query=query, method="GET", host="ec2.amazonaws.com"))
    assert launch is not None
    assert launch.items == items(("p5.48xlarge", 2))
    assert launch.region == "us-east-1"


def test_post_query_and_body_count_together() -> None:
    """A POST's query parameters and form parameters are one request."""
    launch = EC2.parse(
        request("InstanceType=p5.48xlarge&MinCount=1&MaxCount=4", "Action=RunInstances")
    )
    assert launch is not None and launch.items == items(("p5.48xlarge", 4))


@pytest.mark.parametrize(
    ("host", "route_region", "region"),
    [
        ("ec2.eu-west-1.amazonaws.com", None, "eu-west-1"),
        ("EC2.AP-SOUTHEAST-2.AMAZONAWS.COM:443", None, "ap-southeast-2"),
        ("ec2.amazonaws.com", None, "us-east-1"),
        ("compute.internal.example", None, None),
        ("ec2.evil.example.com", None, None),
        ("ec2.eu-west-1.amazonaws.com", "cn-north-1", "cn-north-1"),
    ],
)
def test_region_from_route_else_host(
    host: str, route_region: str | None, region: str | None
) -> None:
    """The route's region wins; else an ec2.<region>.amazonaws.com Host; else none."""
    dialect = build({"region": route_region} if route_region else {}, "routes[0]")
    launch = dialect.parse(
        request("Action=RunInstances&InstanceType=m7i.large&MinCount=1&MaxCount=1", host=host)
    )
    assert launch is not None and launch.region == region


def bad(case_id: str, body: str, **options: Any) -> Any:
    return pytest.param(body, options, id=case_id)


RUN_ = "Action=RunInstances&MinCount=1&MaxCount=1&"
FLEET = "Action=CreateFleet&TargetCapacitySpecification.TotalTargetCapacity=1&"
OVR = "LaunchTemplateConfigs.1.Overrides.1."
MALFORMED = [
    # §7 item 22: a repeated parameter, plain or in a list
    bad("repeated", RUN_ + "InstanceType=t3.micro&InstanceType=p4d.24xlarge"),
    bad("repeated-index", FLEET + f"{OVR}InstanceType=m7i.large&{OVR}InstanceType=p5.48xlarge"),
    # §7 item 24: double encoding, '+' games, bad escapes, overlong UTF-8, NUL
    bad("double-encoded-name", RUN_ + "Instance%2554ype=p5.48xlarge"),
    bad("plus-in-action", "Action=RunInstances+&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1"),
    bad("bad-escape", RUN_ + "InstanceType=p5%G148xlarge"),
    bad("truncated-escape", RUN_ + "InstanceType=p5.48xlarge%"),
    bad("overlong-utf8", RUN_ + "InstanceType=p5%C0%AE48xlarge"),
    bad("nul-in-value", RUN_ + "InstanceType=m7i.large%00p5.48xlarge"),
    # §7 item 25: case variants of names the dialect reads, and of launch Actions
    bad("lower-name", RUN_ + "instancetype=p5.48xlarge"),
    bad("upper-name", RUN_ + "INSTANCETYPE=p5.48xlarge"),
    bad("case-pair", RUN_ + "InstanceType=m7i.large&instanceType=p5.48xlarge"),
    bad("upper-action-name", "ACTION=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1"),
    bad("lower-action", "Action=runinstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1"),
    bad("nested-case", FLEET + "LaunchTemplateConfigs.1.overrides.1.InstanceType=p5.48xlarge"),
    bad("template-data-case", "Action=CreateLaunchTemplate&launchTemplateData.InstanceType=p5"),
    bad(
        "attribute-case", "Action=ModifyInstanceAttribute&Attribute=InstanceType&Value=p5.48xlarge"
    ),
    # §7 item 26: indices two readers could number differently; name/structure clashes
    bad(
        "leading-zero-index",
        FLEET + "LaunchTemplateConfigs.1.Overrides.01.InstanceType=p5.48xlarge",
    ),
    bad("value-and-structure", RUN_ + "InstanceType=m7i.large&InstanceType.Value=p5.48xlarge"),
    bad("empty-component", RUN_ + "InstanceType=m7i.large&Placement..Zone=a"),
    # §7 item 27: ';' separators, '&amp;', a pair without '=', no Action at all
    bad("semicolon", RUN_ + "InstanceType=m7i.large;InstanceType=p5.48xlarge"),
    bad("amp-entity", RUN_ + "amp;InstanceType=p5.48xlarge"),
    bad("no-equals", RUN_ + "DryRun&InstanceType=p5.48xlarge"),
    bad("no-action", "InstanceType=p5.48xlarge&MinCount=1&MaxCount=1"),
    # §7 item 15 / CONTRACT §9: counts are digits, 1..100000
    bad("negative-count", "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=-1"),
    bad("plus-count", "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=%2B3"),
    bad("fraction-count", "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=3.0"),
    bad("exponent-count", "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1e3"),
    bad("huge-count", "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=100001"),
    bad("zero-count", "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=0&MaxCount=0"),
    bad("spaced-count", "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=+3"),
    bad("empty-type", RUN_ + "InstanceType="),
    bad("weight-zero", FLEET + f"{OVR}InstanceType=p5.48xlarge&{OVR}WeightedCapacity=0"),
    bad("weight-exponent", FLEET + f"{OVR}InstanceType=p5.48xlarge&{OVR}WeightedCapacity=1e-3"),
    bad(
        "weighted-over-limit",
        "Action=CreateFleet&TargetCapacitySpecification.TotalTargetCapacity=1000&"
        f"{OVR}InstanceType=p5.48xlarge&{OVR}WeightedCapacity=0.001",
    ),
    bad("fleet-without-target", f"Action=CreateFleet&{OVR}InstanceType=p5.48xlarge"),
    bad(
        "both-type-forms",
        "Action=ModifyInstanceAttribute&InstanceType.Value=m7i.large"
        "&Attribute=instanceType&Value=p5.48xlarge",
    ),
    # §7 items 41-42: encodings and content types the gateway does not read as a form
    bad("gzip", RUN_ + "InstanceType=p5.48xlarge", **{"Content-Encoding": "gzip"}),
    bad("text-plain", RUN_ + "InstanceType=p5.48xlarge", content_type="text/plain"),
    bad("no-content-type", RUN_ + "InstanceType=p5.48xlarge", content_type=None),
    bad("multipart", RUN_, content_type="multipart/form-data; boundary=x"),
    bad("amz-json", '{"InstanceType": "p5.48xlarge"}', content_type="application/x-amz-json-1.1"),
    bad("utf16-charset", RUN_, content_type="application/x-www-form-urlencoded; charset=utf-16"),
    bad("raw-utf8", RUN_ + "InstanceType=p5.48xlarge\u00e9"),
    bad("bom", "\ufeff" + RUN_ + "InstanceType=p5.48xlarge"),
    bad("get-with-body", RUN_ + "InstanceType=p5.48xlarge", method="GET"),
]


@pytest.mark.parametrize(("body", "options"), MALFORMED)
def test_requests_with_no_one_meaning_are_malformed(body: str, options: dict[str, Any]) -> None:
    """Repeats, case variants, encodings and counts with two readings raise MalformedLaunch."""
    with pytest.raises(MalformedLaunch):
        EC2.parse(request(body, **options))


def test_repeat_across_query_and_body_is_malformed() -> None:
    """§7 item 23: the same parameter in the query and the body has no one meaning."""
    with pytest.raises(MalformedLaunch, match="more than once"):
        EC2.parse(
            request(
                "Action=RunInstances&InstanceType=t3.micro&MinCount=1&MaxCount=1",
                "InstanceType=p4d.24xlarge",
            )
        )


def test_unread_near_miss_names_pass_for_actions_that_launch_nothing() -> None:
    """Case checks apply to launches; other Actions are forwarded as they are."""
    assert EC2.parse(request("Action=DescribeInstances&instancetype=x")) is None


@pytest.mark.parametrize(
    ("method", "path", "claimed"),
    [
        ("POST", "/", True),
        ("GET", "/", True),
        ("POST", "/anything/at/all", True),  # EC2 serves its API on any path
        ("PUT", "/", True),  # found by QA: launched on the stub, unjudged
        ("DELETE", "/x", True),
        ("HEAD", "/", True),
        ("PROPFIND", "/", True),
    ],
)
def test_claims_every_method_under_the_path(method: str, path: str, claimed: bool) -> None:
    """The route claims every request under its path, whatever the method."""
    assert EC2.claims(method, path) is claimed


def test_claims_only_under_a_mounted_path() -> None:
    """Mounted at /ec2, the route claims /ec2 and below, not /ec2x."""
    dialect = build({"path": "/ec2"}, "routes[0]")
    assert dialect.claims("POST", "/ec2") and dialect.claims("POST", "/ec2/x")
    assert not dialect.claims("POST", "/ec2x") and not dialect.claims("POST", "/")


def test_claims_its_mount_however_a_case_folding_router_reads_it() -> None:
    """EC2 ignores the path, so a router that decodes paths and ignores case sends these to it
    too: escapes of letters that match ASCII ones in another case (a long s, a dotless i)."""
    dialect = build({"path": "/aws/ec2"}, "routes[0]")
    for path in ("/AWS/EC2", "/aw%C5%BF/ec2", "/AW%c5%bf/Ec2/x", "/aw\u017f/ec2"):
        assert dialect.claims("GET", path), path
    assert not dialect.claims("GET", "/aw%C5%BFx/ec2")


def test_claims_folds_only_the_mount_s_share_of_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long path of escapes is not folded whole, route after route (found in review: 9 KB of
    them cost 1.9 ms on each catch-all route): only as many segments as the mount has."""
    import launchgate.dialects as dialects
    from launchgate.paths import fold_path as real

    folded: list[str] = []

    def counted(path: str) -> str:
        folded.append(path)
        return real(path)

    monkeypatch.setattr(dialects, "fold_path", counted)
    dialect = build({"path": "/aws/ec2"}, "routes[0]")
    assert dialect.claims("GET", "/aws/ec2" + "/%C5%BF" * 1000)
    assert max(len(p) for p in folded) <= len("/aws/ec2")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"sku": "/x"}, "routes[3]: unknown key 'sku'"),
        ({"path": "/a//b"}, "routes[3].path"),
        ({"path": "relative"}, "routes[3].path"),
        ({"path": 7}, "routes[3].path"),
        ({"region": 5}, "routes[3].region"),
        ({"region": ""}, "routes[3].region"),
    ],
)
def test_build_rejects_bad_route_keys(table: dict[str, Any], message: str) -> None:
    """ConfigError names the route and the key at fault."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(table, "routes[3]")


def test_build_defaults() -> None:
    """The default route is mounted at / with no region, for every method."""
    assert build({}, "r") == AwsEc2(path="/", region=None)
    assert EC2.methods == EVERY_METHOD and EC2.name == "aws-ec2"


# --- the strict Query reader: one reading or none --------------------------------------------

NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}(\.[A-Za-z0-9]{1,4}){0,2}", fullmatch=True)
# Mostly characters the encoding treats specially; sometimes any UTF-8 text.
VALUES = st.text(st.sampled_from(" +%&=;.~aZ0é€"), max_size=12) | st.text(
    st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=12
)


def _encode(text: str, data: st.DataObject) -> str:
    """Percent-encode ``text`` with arbitrary choices: which safe characters, hex case, + for space."""
    out = []
    for char in text:
        if char == " " and data.draw(st.booleans()):
            out.append("+")
        elif char.isascii() and (char.isalnum() or char in "-._~") and data.draw(st.booleans()):
            out.append(char)
        else:
            escaped = quote(char, safe="")
            if escaped == char:
                escaped = f"%{ord(char):02X}"
            out.append(escaped.lower() if data.draw(st.booleans()) else escaped)
    return "".join(out)


@given(
    pairs=st.lists(st.tuples(NAMES, VALUES), max_size=6, unique_by=lambda p: p[0].lower()),
    twin=st.sampled_from([None, str, str.swapcase]),
    data=st.data(),
)
def test_any_encoding_reads_as_the_pairs_or_is_refused(
    pairs: list[tuple[str, str]], twin: Callable[[str], str] | None, data: st.DataObject
) -> None:
    """However the pairs are encoded and ordered, they read back exactly; with a name given
    again (as is, or in other letter case) they are refused. An accepted reading survives
    re-encoding."""
    sent = list(pairs)
    if twin is not None and pairs:  # names start with a letter: swapcase always differs
        sent.append((twin(pairs[0][0]), data.draw(VALUES)))
    else:
        twin = None
    text = "&".join(
        f"{_encode(n, data)}={_encode(v, data)}" for n, v in data.draw(st.permutations(sent))
    )
    if twin is not None:
        with pytest.raises(MalformedLaunch, match=r"more than once|letter case"):
            parse_params(text)
        return
    params = parse_params(text)
    assert dict(params) == dict(pairs)
    assert parse_params(encode_params(params)) == params


@given(text=st.text(st.sampled_from("Aa=&%+;.2F41é\x00 b"), max_size=24))
def test_whatever_is_accepted_has_one_reading(text: str) -> None:
    """Any accepted text re-encodes canonically to the same reading, with no case-twin names."""
    try:
        params = parse_params(text)
    except MalformedLaunch:
        return
    assert len({name.lower() for name in params}) == len(params)
    assert parse_params(encode_params(params)) == params
    # split differently (query versus body), it still reads the same
    middle = text.find("&")
    if middle > 0:
        assert parse_params(text[:middle], text[middle + 1 :]) == params


def test_plus_is_a_space_and_escapes_decode_once() -> None:
    """'+' and %20 are spaces, %2B is a plus, %2525 is '%25': decoded exactly once."""
    assert parse_pairs("a=x+y%20z%2B&b=%2525&c=x+y", "query") == [
        ("a", "x y z+"),
        ("b", "%25"),
        ("c", "x y"),
    ]


def test_empty_segments_carry_nothing() -> None:
    """A trailing or doubled '&' adds no parameter."""
    assert parse_pairs("a=1&&b=2&", "query") == [("a", "1"), ("b", "2")]


def test_nest_reads_dotted_names_as_a_tree() -> None:
    """Dotted names nest; list members come in index order."""
    tree = nest(parse_params("L.2.T=b&L.1.T=a&S.M=x"))
    assert [(i, e.value("T")) for i, e in tree.members("L")] == [("1", "a"), ("2", "b")]
    node = tree.node("S")
    assert node is not None and node.value("M") == "x"


# --- end to end: the gateway in front of the stub ---------------------------------------------

RUN_P5 = (
    "Action=RunInstances&Version=2016-11-15&ImageId=ami-60a54009&InstanceType=p5.48xlarge"
    "&MinCount=1&MaxCount=2&Placement.AvailabilityZone=us-east-1d"
)


async def ec2_call(
    gw: Any,
    body: str | bytes = "",
    *,
    method: str = "POST",
    target: str = "/",
    account: str | None = RESTRICTED,
    token: str | None = None,
    headers: CIMultiDict[str] | dict[str, str] | None = None,
    chunked: bool = False,
) -> tuple[int, str, Any]:
    """Send one raw EC2 call (target and body exactly as given) and return status, text, headers."""
    h: CIMultiDict[str] = CIMultiDict({"Host": "ec2.us-east-1.amazonaws.com"})
    if method == "POST" and body:
        h["Content-Type"] = FORM
    if headers is not None:
        for key in set(headers.keys()):
            h.popall(key, None)
        h.extend(headers)
    if account is not None:
        h["X-Account-Id"] = account
    if token is not None:
        h["License-Token"] = token
    raw = body.encode() if isinstance(body, str) else body
    data: Any = raw

    if chunked:

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), 7):
                yield raw[i : i + 7]

        data = pieces()
    url = URL(f"{gw.url}{target}", encoded=True)
    async with gw.session.request(method, url, data=data or None, headers=h) as r:
        return r.status, await r.text(), r.headers


async def test_unrestricted_account_launches_and_gets_ec2_xml(start_gateway: StartGateway) -> None:
    """Allowed: the stub answers RunInstancesResponse XML and receives the bytes judged."""
    gw = await start_gateway(routes=[ROUTE])
    status, text, headers = await ec2_call(gw, RUN_P5, account=UNRESTRICTED)
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/xml")
    assert '<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">' in text
    assert text.count("<instanceType>p5.48xlarge</instanceType>") == 2
    decision = gw.decisions()[-1]
    assert (decision["reason"], decision["sku"], decision["count"]) == (
        "account_not_restricted",
        H100_SKU,
        2,
    )
    assert decision["region"] == "us-east-1"
    [received] = await gw.stub_requests()
    assert received["body"] == RUN_P5 and received["path"] == "/"


async def test_restricted_account_without_token_is_denied(start_gateway: StartGateway) -> None:
    """Denied: a restricted account needs a license; nothing reaches the stub."""
    gw = await start_gateway(routes=[ROUTE])
    status, text, _ = await ec2_call(gw, RUN_P5)
    assert status == 403
    assert '"license_required"' in text
    assert await gw.stub_requests() == []


async def test_the_first_item_that_denies_decides_a_fleet(start_gateway: StartGateway) -> None:
    """Found by QA: a fleet of p5.48xlarge and a type the catalog lacks, from a restricted
    account without a token, was unknown_sku (row 6 applied to all items before row 7 to any);
    the first item, p5.48xlarge, denies first: license_required, and the record says so."""
    gw = await start_gateway(routes=[ROUTE])
    body = (
        "Action=CreateFleet&Type=instant"
        "&LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateName=gpu"
        "&LaunchTemplateConfigs.1.Overrides.1.InstanceType=p5.48xlarge"
        "&LaunchTemplateConfigs.1.Overrides.2.InstanceType=zz.unknown"
        "&TargetCapacitySpecification.TotalTargetCapacity=2"
    )
    status, text, _ = await ec2_call(gw, body)
    assert status == 403 and '"license_required"' in text
    decision = gw.decisions()[-1]
    assert (decision["reason"], decision["sku"]) == ("license_required", H100_SKU)
    assert [i["sku"] for i in decision["items"]] == [H100_SKU, "zz.unknown"]
    assert await gw.stub_requests() == []


async def test_licensed_launch_reaches_ec2_and_uses_the_license(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Licensed: a covering token lets it through; 2 x 8 accelerators are used."""
    gw = await start_gateway(routes=[ROUTE])
    token = make_token(jti="lic-ec2", regions=["us-east-1"])
    status, text, _ = await ec2_call(gw, RUN_P5, token=token)
    assert status == 200, text
    assert "<RunInstancesResponse" in text
    state = await gw.license("lic-ec2")
    assert state is not None and state.used == 16
    assert gw.decisions()[-1]["reason"] == "licensed"


async def test_template_needs_a_license_but_reserves_nothing(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """CreateLaunchTemplate naming a controlled type: denied bare, licensed with 0 used."""
    gw = await start_gateway(routes=[ROUTE])
    body = (
        "Action=CreateLaunchTemplate&Version=2016-11-15&LaunchTemplateName=train"
        "&LaunchTemplateData.ImageId=ami-1a2b3c4d&LaunchTemplateData.InstanceType=p5.48xlarge"
    )
    status, _, _ = await ec2_call(gw, body)
    assert status == 403
    assert await gw.stub_requests() == []
    status, text, _ = await ec2_call(gw, body, token=make_token(jti="lic-tmpl"))
    assert status == 200 and "<CreateLaunchTemplateResponse" in text
    state = await gw.license("lic-tmpl")
    assert state is not None and state.used == 0


async def test_non_launch_actions_pass_unjudged(start_gateway: StartGateway) -> None:
    """DescribeInstances from a restricted account is forwarded and records no decision."""
    gw = await start_gateway(routes=[ROUTE])
    status, text, _ = await ec2_call(
        gw, method="GET", target="/?Action=DescribeInstances&Version=2016-11-15"
    )
    assert status == 200 and "<DescribeInstancesResponse" in text
    assert gw.decisions() == []
    [received] = await gw.stub_requests()
    assert received["query"] == "Action=DescribeInstances&Version=2016-11-15"


async def test_unresolvable_launch_denied_for_restricted_only(start_gateway: StartGateway) -> None:
    """A template launch without a type: 403 unresolvable_launch unless unrestricted."""
    gw = await start_gateway(routes=[ROUTE])
    body = "Action=RunInstances&LaunchTemplate.LaunchTemplateId=lt-1&MinCount=1&MaxCount=1"
    status, text, _ = await ec2_call(gw, body)
    assert status == 403 and '"unresolvable_launch"' in text
    assert await gw.stub_requests() == []
    status, _, _ = await ec2_call(gw, body, account=UNRESTRICTED)
    assert status == 200


async def test_uncontrolled_type_passes_for_restricted(start_gateway: StartGateway) -> None:
    """A CPU-only type needs no license, restricted account or not."""
    gw = await start_gateway(routes=[ROUTE])
    body = f"Action=RunInstances&InstanceType={CPU_SKU}&MinCount=1&MaxCount=1"
    status, _, _ = await ec2_call(gw, body)
    assert status == 200
    assert gw.decisions()[-1]["reason"] == "sku_not_controlled"


P5 = "InstanceType=p5.48xlarge&MinCount=1&MaxCount=1"
RUN = f"Action=RunInstances&{P5}"


def bypass(case_id: str, reason: str, body: str | bytes = "", **options: Any) -> Any:
    """One corpus entry; the id starts with its item number in reference §7."""
    return pytest.param(body, options, reason, id=case_id)


BYPASSES = [
    bypass("01-template-without-type", "unresolvable_launch",
           "Action=RunInstances&LaunchTemplate.LaunchTemplateName=gpu&MinCount=1&MaxCount=1"),
    bypass("01-template-version", "license_required",
           "Action=CreateLaunchTemplateVersion&LaunchTemplateId=lt-1"
           "&LaunchTemplateData.InstanceType=p5.48xlarge"),
    bypass("02-instance-requirements", "unresolvable_launch",
           FLEET + f"{OVR}InstanceRequirements.AcceleratorCount.Min=1"),
    bypass("03-create-fleet", "license_required",
           FLEET + f"{OVR}InstanceType=m7i.large&LaunchTemplateConfigs.1.Overrides.2.InstanceType=p5.48xlarge"),
    bypass("03-modify-fleet", "unresolvable_launch",
           "Action=ModifyFleet&FleetId=fleet-1&TargetCapacitySpecification.TotalTargetCapacity=40"),
    bypass("03-spot-fleet", "license_required",
           "Action=RequestSpotFleet&SpotFleetRequestConfig.TargetCapacity=1"
           "&SpotFleetRequestConfig.LaunchSpecifications.1.InstanceType=p5.48xlarge"),
    bypass("03-modify-spot-fleet", "unresolvable_launch",
           "Action=ModifySpotFleetRequest&SpotFleetRequestId=sfr-1&TargetCapacity=9"),
    bypass("05-auto-scaling", "unresolvable_launch",
           "Action=SetDesiredCapacity&AutoScalingGroupName=gpu-asg&DesiredCapacity=64"),
    bypass("03-fleet-rebalance-launch", "unresolvable_launch",
           FLEET + f"{OVR}InstanceType=p5.48xlarge"
           "&SpotOptions.MaintenanceStrategies.CapacityRebalance.ReplacementStrategy=launch"),
    bypass("03-fleet-rebalance-case", "malformed_request",
           FLEET + f"{OVR}InstanceType=p5.48xlarge"
           "&SpotOptions.MaintenanceStrategies.CapacityRebalance.replacementStrategy=launch"),
    bypass("05-scaling-policy", "unresolvable_launch",
           "Action=PutScalingPolicy&AutoScalingGroupName=gpu-asg&PolicyName=up&ScalingAdjustment=8"),
    bypass("05-detach-instances", "unresolvable_launch",
           "Action=DetachInstances&AutoScalingGroupName=gpu-asg&InstanceIds.member.1=i-1"
           "&ShouldDecrementDesiredCapacity=false"),
    bypass("04-spot-instances", "license_required",
           "Action=RequestSpotInstances&Type=persistent&LaunchSpecification.InstanceType=p5.48xlarge"),
    bypass("04-spot-market", "license_required", RUN + "&InstanceMarketOptions.MarketType=spot"),
    bypass("06-resize", "license_required",
           "Action=ModifyInstanceAttribute&InstanceId=i-1&InstanceType.Value=p5.48xlarge"),
    bypass("06-resize-attribute", "license_required",
           "Action=ModifyInstanceAttribute&InstanceId=i-1&Attribute=instanceType&Value=p5.48xlarge"),
    bypass("09-capacity-reservation", "license_required",
           "Action=CreateCapacityReservation&InstanceType=p5.48xlarge&InstanceCount=1"),
    bypass("09-capacity-block", "unresolvable_launch",
           "Action=PurchaseCapacityBlock&CapacityBlockOfferingId=cbo-1"),
    bypass("13-elastic-inference", "unknown_sku",
           RUN_ + "InstanceType=m7i.large&ElasticInferenceAccelerator.1.Type=eia2.xlarge"),
    bypass("15-huge-count", "malformed_request",
           "Action=RunInstances&InstanceType=m7i.large&MinCount=1&MaxCount=1000000"),
    bypass("16-vcpu-units", "unresolvable_launch",
           FLEET + f"{OVR}InstanceType=m7i.large&TargetCapacitySpecification.TargetCapacityUnitType=vcpu"),
    bypass("22-repeated", "malformed_request",
           RUN_ + "InstanceType=m7i.large&InstanceType=p5.48xlarge"),
    bypass("23-query-and-body", "malformed_request", RUN_ + "InstanceType=m7i.large",
           target="/?InstanceType=p5.48xlarge"),
    bypass("24-encoded-name", "license_required",
           "Action=Run%49nstances&Instance%54ype=p5.48xlarge&MinCount=1&MaxCount=1"),
    bypass("24-double-encoded", "malformed_request",
           RUN_ + "InstanceType=m7i.large&Instance%2554ype=p5.48xlarge"),
    bypass("25-lower-case-name", "malformed_request",
           RUN_ + "InstanceType=m7i.large&instancetype=p5.48xlarge"),
    bypass("25-upper-case-name", "malformed_request", RUN_ + "INSTANCETYPE=p5.48xlarge"),
    bypass("25-lower-case-action", "malformed_request", f"Action=runinstances&{P5}"),
    bypass("25-action-name-case", "malformed_request", f"action=RunInstances&{P5}"),
    bypass("26-leading-zero-index", "malformed_request",
           FLEET + f"{OVR}InstanceType=m7i.large&LaunchTemplateConfigs.1.Overrides.01.InstanceType=p5.48xlarge"),
    bypass("26-zero-index", "license_required",
           FLEET + "LaunchTemplateConfigs.0.Overrides.0.InstanceType=p5.48xlarge"),
    bypass("27-semicolon", "malformed_request", RUN_ + "InstanceType=m7i.large;InstanceType=p5.48xlarge"),
    bypass("27-amp-entity", "malformed_request", method="GET",
           target="/?Action=RunInstances&amp;InstanceType=p5.48xlarge&amp;MinCount=1&amp;MaxCount=1"),
    bypass("29-dry-run", "license_required", RUN + "&DryRun=true"),
    bypass("39-chunked", "license_required", RUN, chunked=True),
    bypass("41-gzip", "malformed_request", gzip.compress(RUN.encode()),
           headers={"Content-Encoding": "gzip"}),
    bypass("42-text-plain", "malformed_request", RUN, headers={"Content-Type": "text/plain"}),
    bypass("42-amz-json", "malformed_request", '{"InstanceType":"p5.48xlarge","MaxCount":1}',
           headers={"Content-Type": "application/x-amz-json-1.1",
                    "X-Amz-Target": "AmazonEC2.RunInstances"}),
    bypass("42-multipart", "malformed_request", RUN,
           headers={"Content-Type": "multipart/form-data; boundary=b"}),
    bypass("43-method-override", "malformed_request", RUN,
           headers={"X-HTTP-Method-Override": "GET"}),
    bypass("44-any-path", "license_required", RUN, target="/some/other/path"),
    bypass("44-double-slash", "license_required", RUN, target="//"),
    bypass("44-get-query", "license_required", method="GET", target=f"/?{RUN}"),
    bypass("44-get-with-body", "malformed_request", RUN, method="GET",
           headers={"Content-Type": FORM}),
]  # fmt: skip


@pytest.mark.parametrize(("body", "options", "reason"), BYPASSES)
async def test_bypass_corpus_never_reaches_the_upstream(
    start_gateway: StartGateway, body: str | bytes, options: dict[str, Any], reason: str
) -> None:
    """Every EC2 bypass of reference §7 gets its 4xx for a restricted account; the stub sees
    nothing."""
    gw = await start_gateway(routes=[ROUTE])
    status, text, _ = await ec2_call(gw, body, **options)
    assert 400 <= status < 500, text
    assert json.loads(text)["reason"] == reason
    assert await gw.stub_requests() == []


async def test_body_labelled_gzip_that_is_not_gzip_is_malformed(
    start_gateway: StartGateway,
) -> None:
    """§7 item 41: a Content-Encoding the gateway does not decode is 400, whatever the bytes."""
    gw = await start_gateway(routes=[ROUTE])
    status, text, _ = await ec2_call(gw, RUN_P5, headers={"Content-Encoding": "gzip"})
    assert status == 400 and '"malformed_request"' in text
    assert await gw.stub_requests() == []


@pytest.mark.parametrize(
    ("body", "options"),
    [
        # Rack 2 takes the last of the two as the Action (found in review)
        (f"Action=DescribeInstances&Action]=RunInstances&{P5_8}", {}),
        (f"Action=DescribeInstances&{P5_8}&%5BAction%5D=RunInstances", {}),  # qs
        (f"Action=RunInstances&{P5_8}&Action%5B%5D=CreateFleet", {}),
        # PHP's $_REQUEST and System.Web's Request[...] read cookies among the parameters
        ("", {"method": "GET", "headers": {"Cookie": f"Action=RunInstances; {P5_8}"}}),
        (
            "",
            {
                "method": "GET",
                "target": "/?Action=DescribeInstances",
                "headers": {"Cookie": "Action=RunInstances"},
            },
        ),
        # a cookie naming a judged parameter, which PHP's $_REQUEST takes over the query's
        (
            "",
            {
                "method": "GET",
                "target": "/?Action=RunInstances&InstanceType=g4dn.xlarge&MinCount=1&MaxCount=1",
                "headers": {"Cookie": "InstanceType=p5.48xlarge; MaxCount=8"},
            },
        ),
    ],
)
async def test_a_launch_action_named_outside_action_is_malformed(
    start_gateway: StartGateway, body: str, options: dict[str, Any]
) -> None:
    """A launch Action in another parameter's value, or in a cookie, is a second meaning that
    some upstream takes as the Action: 400 for every account, and nothing reaches the stub."""
    gw = await start_gateway(routes=[ROUTE])
    for account in (RESTRICTED, UNRESTRICTED):
        status, text, _ = await ec2_call(gw, body, account=account, **options)
        assert status == 400 and json.loads(text)["reason"] == "malformed_request", text
    assert await gw.stub_requests() == []


async def test_an_arm_call_under_an_ec2_mount_naming_an_action_anywhere_is_malformed(
    start_gateway: StartGateway,
) -> None:
    """The second reading of a request another route takes finds a launch Action whatever the
    parameter's name (found in review: "[Action]=RunInstances", which Express with qs reads as
    the Action, went unread: an ARM PATCH that launches nothing, carrying it, would have gone
    on unjudged to an upstream serving EC2 on "/")."""
    gw = await start_gateway(routes=[ROUTE, {"dialect": "azure-arm"}])
    vm = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm"
    for query in (f"%5BAction%5D=RunInstances&{P5_8}", f"Action%5B%5D=RunInstances&{P5_8}"):
        target = f"{vm}?api-version=2024-07-01&{query}"
        status, answer = await gw.send("PATCH", target, {"tags": {"team": "ml"}})
        assert (status, answer["reason"]) == (400, "malformed_request")
    status, _ = await gw.send("PATCH", f"{vm}?api-version=2024-07-01", {"tags": {"team": "ml"}})
    assert status != 400  # the same call without it goes on
    assert len(await gw.stub_requests()) == 1


async def test_other_apis_reads_beside_ec2_on_the_root_go_on_unjudged(
    start_gateway: StartGateway,
) -> None:
    """Found by QA: with aws-ec2 and azure-arm both on "/", every ARM read (its
    "?api-version=") and every Compute Engine list with a query was 400 "parameters without
    an Action". A request with no body that names no Action in any way an upstream reads one
    goes on unjudged (no record); one that names one anyhow is still read as EC2, strictly."""
    gw = await start_gateway(routes=[ROUTE, {"dialect": "azure-arm"}, {"dialect": "gcp-compute"}])
    vm = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm"
    reads = [
        f"{vm}?api-version=2024-07-01",
        "/compute/v1/projects/p/zones/us-central1-a/instances?maxResults=5&filter=x",
        "/v1/instances?limit=2",
    ]
    for target in reads:
        status, answer = await gw.send("GET", target, b"", headers={})
        assert status != 400, answer
    seen = [r["path"] for r in await gw.stub_requests()]
    assert len(seen) == 3 and gw.decisions() == []
    amz = {"X-Amz-Target": "AmazonEC2.RunInstances"}
    refused: list[tuple[str, str, dict[str, Any] | bytes, dict[str, str]]] = [
        ("GET", f"/?%5BAction%5D=RunInstances&{P5_8}", b"", {}),
        ("GET", f"/?{P5_8}", b"", amz),
        ("GET", f"/?{P5_8}", b"", {"Cookie": "Action=RunInstances"}),
        ("GET", f"/RunInstances?{P5_8}", b"", {}),
        ("GET", f"/RunInstances;x=1?{P5_8}", b"", {}),
        ("GET", f"/?request.Action=RunInstances&{P5_8}", b"", {}),
        ("GET", f"/?{P5_8}", b"", {"X_Amz_Target": "AmazonEC2.RunInstances"}),
        # the second reading of another route's request (an ARM PATCH) sees X-Amz-Target too
        ("PATCH", f"{vm}?api-version=2024-07-01&{P5_8}", {"tags": {}}, amz),
        ("PATCH", f"{vm}?api-version=1&{P5_8}", {"tags": {}}, {"X_Amz_Target": "ec2.RunInstances"}),
    ]
    for method, target, body, headers in refused:
        headers = {"Content-Type": "application/json", **headers}
        status, answer = await gw.send(method, target, body, headers=headers)
        assert (status, answer.get("reason")) == (400, "malformed_request"), (target, answer)
    assert len(await gw.stub_requests()) == 3


# --- the second reading of a request another route takes (``AwsEc2.launch_action``) ----------


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("api-version=1&Action=RunInstances", "RunInstances"),
        ("%2541ction=RunInstances", "RunInstances"),  # an upstream that decodes twice
        ("Action=Run%2549nstances", "RunInstances"),
        ("q=1%2526Action%253DCreateFleet", "CreateFleet"),  # decoded, then split
        ("x=1;action=runinstances", "RunInstances"),
        ("Action%00x=RequestSpotInstances", "RequestSpotInstances"),
        ("Action+=+RunInstances+", "RunInstances"),
        # Whatever the name: frameworks read these as Action (found in review: Express with qs,
        # Rack 2 and PHP 8 launched p5.48xlarges on them), and values folded or spelt loosely.
        ("%5BAction%5D=RunInstances", "RunInstances"),
        ("[Action]=RunInstances", "RunInstances"),
        ("Action]=RunInstances", "RunInstances"),
        ("Action%5B%5D=RunInstances", "RunInstances"),
        ("Action%5B0%5D=RunInstances", "RunInstances"),
        ("+" * 600 + "Action=RunInstances", "RunInstances"),
        ("Action%00" + "x" * 600 + "=RunInstances", "RunInstances"),
        ("%u0041ction=R%u0075nInstances", "RunInstances"),
        ("Action=RunIn%C5%BFtances", "RunInstances"),  # the long s, upper-cased by .NET
        ("Action=run_instances", "RunInstances"),
        ("Action=Run+Instances", "RunInstances"),
        ("Act%C4%B1on=R%00u%00n%00Instances", "RunInstances"),  # NULs dropped, not cut at
        ("request.Action=RunInstances", "RunInstances"),  # qs allowDots, ASP.NET (review)
        ("%5B0%5D.Action=CreateFleet", "CreateFleet"),
        # not a parameter read as Action: other values naming an Action are no second meaning
        # (found in review: the auto-tagging filter below was 400)
        (
            "Action=DescribeInstances&Filter.1.Name=tag:CreatedBy&Filter.1.Value.1=RunInstances",
            None,
        ),
        ("Action=CreateTags&Tag.1.Value=create-fleet", None),
        ("Action=DescribeInstances", None),
        ("Action=RunInstancesNow", None),
        ('{"name": "vm-1", "note": "action items"}', None),
        ("", None),
    ],
)
def test_the_second_reading_finds_a_launch_action(text: str, action: str | None) -> None:
    assert _launch_actions_in(text)[0] == action


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("%41" * 5000, "percent-escapes"),
        ("action=x&" * 100, "could be an EC2 Action"),
        # padding an upstream trims (found in review: Laravel trims every value)
        ("a=1&Action=" + "+" * 600 + "CreateFleet", "value over 512 characters"),
        ("Action=" + "%20" * 171 + "RunInstances", "value over 512 characters"),
        # one escape nested 8 deep before 1 MiB of filler took 0.5-0.65 s (found in review)
        ("%2525252525252525" + "26" + "x" * 65536, "over 65536 characters with escaped"),
    ],
)
def test_the_second_reading_refuses_what_it_cannot_read_in_time(text: str, complaint: str) -> None:
    """Its work is bounded: a request of 1 MiB crafted to be decoded and split over and over
    held the event loop for 0.6-0.8 s before the bounds (measured); now at most about 40 ms."""
    with pytest.raises(MalformedLaunch, match=complaint):
        _launch_actions_in(text)

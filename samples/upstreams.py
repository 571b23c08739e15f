"""Sample upstream data services for ``pdg demo``, the tests and the benchmarks.

Three public-data services of the city of Wuhan, served by one aiohttp
application on one port, each under its own path prefix:

``/ent-registry``
    Enterprise registration lookup (市场主体登记): about 500 enterprises with
    unified social credit codes that carry a valid GB 32100-2015 check character.
``/weather``
    Weather observations (气象观测): a dozen stations and 24 hourly observations
    per station and day, following a plausible seasonal and diurnal curve.
``/bus``
    Bus lines (公交线路): about 40 lines with operator, timetable, fare and stops.

Everything is generated deterministically from fixed seeds (no network, no data
files), once and lazily. The data is invented; it only looks like the real thing.

Every JSON array response carries ``X-Record-Count: <len>``, every object
response ``X-Record-Count: 1``. Errors are JSON objects ``{"error": "..."}``.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any, TypedDict

import orjson
from aiohttp import web

from licensing.credit_code import ALPHABET, with_check_character

__all__ = [
    "SAMPLE_DATASETS",
    "SampleDataset",
    "sample_app",
    "start_sample_upstream",
]

# China Standard Time; Asia/Shanghai has had no daylight saving time since 1991.
_CST = timezone(timedelta(hours=8), "Asia/Shanghai")

_JSON = "application/json"
_MAX_PAGE_SIZE = 100
_DEFAULT_PAGE_SIZE = 20


@dataclass(frozen=True, slots=True)
class SampleDataset:
    """One sample upstream service, as the gateway would register it."""

    id: str
    name: str
    provider: str
    prefix: str
    classification: int
    open_class: str
    example_path: str


SAMPLE_DATASETS: tuple[SampleDataset, ...] = (
    SampleDataset(
        id="ent-registry",
        name="Enterprise registration lookup (市场主体登记信息查询)",
        provider="market-supervision",
        prefix="/ent-registry",
        classification=2,
        open_class="conditional",
        example_path="enterprises?name=光谷&size=3",
    ),
    SampleDataset(
        id="weather-obs",
        name="Weather observations (气象观测数据)",
        provider="meteorological-bureau",
        prefix="/weather",
        classification=1,
        open_class="open",
        example_path="observations?station=57494",
    ),
    SampleDataset(
        id="bus-lines",
        name="Bus lines and stops (公交线路及站点)",
        provider="transport-bureau",
        prefix="/bus",
        classification=1,
        open_class="open",
        example_path="lines",
    ),
)


# --------------------------------------------------------------------------- records


class Enterprise(TypedDict):
    credit_code: str
    name: str
    legal_representative: str
    registered_capital: int  # 万元 (10,000 CNY)
    establishment_date: str
    district: str
    industry: str
    status: str
    address: str


class Station(TypedDict):
    id: str
    name: str
    district: str
    lat: float
    lon: float
    altitude_m: float


class Observation(TypedDict):
    station: str
    time: str
    temperature_c: float
    humidity_pct: int
    wind_speed_ms: float
    wind_direction: str
    wind_direction_deg: int
    precipitation_mm: float
    pressure_hpa: float


class BusStop(TypedDict):
    seq: int
    name: str
    lat: float
    lon: float


class BusLineSummary(TypedDict):
    id: str
    name: str
    operator: str
    first_bus: str
    last_bus: str
    fare_yuan: float
    origin: str
    terminus: str
    stop_count: int
    length_km: float


class BusLine(BusLineSummary):
    stops: list[BusStop]


# --------------------------------------------------------------- enterprise registry

# (name, administrative division code) of Wuhan's districts.
_DISTRICTS: tuple[tuple[str, str], ...] = (
    ("江岸区", "420102"),
    ("江汉区", "420103"),
    ("硚口区", "420104"),
    ("汉阳区", "420105"),
    ("武昌区", "420106"),
    ("青山区", "420107"),
    ("洪山区", "420111"),
    ("东西湖区", "420112"),
    ("汉南区", "420113"),
    ("蔡甸区", "420114"),
    ("江夏区", "420115"),
    ("黄陂区", "420116"),
    ("新洲区", "420117"),
)
_DISTRICT_WEIGHTS = (9, 8, 6, 7, 9, 4, 14, 7, 2, 5, 9, 5, 4)

_NAME_PLACES = (
    "光谷", "长江", "汉江", "楚天", "东湖", "江城", "黄鹤", "晴川", "珞珈", "知音",
    "汉口", "荆楚", "华中", "鹦鹉洲", "龟山", "南湖", "沌口", "金银湖",
)  # fmt: skip
_NAME_WORDS = (
    "智联", "恒通", "创新", "博远", "瑞丰", "联创", "宏达", "新锐", "云帆", "卓越",
    "盛世", "通达", "汇丰", "鼎盛", "天成", "嘉禾", "信诚", "中科", "锦程", "弘毅",
    "安信", "佳禾", "精工", "明德",
)  # fmt: skip
# (name part, industry category of GB/T 4754)
_NAME_TRADES: tuple[tuple[str, str], ...] = (
    ("科技", "信息传输、软件和信息技术服务业"),
    ("信息技术", "信息传输、软件和信息技术服务业"),
    ("软件", "信息传输、软件和信息技术服务业"),
    ("光电子", "制造业"),
    ("生物医药", "制造业"),
    ("汽车零部件", "制造业"),
    ("机械设备", "制造业"),
    ("物流", "交通运输、仓储和邮政业"),
    ("建设工程", "建筑业"),
    ("装饰工程", "建筑业"),
    ("商贸", "批发和零售业"),
    ("电子商务", "批发和零售业"),
    ("餐饮管理", "住宿和餐饮业"),
    ("文化传媒", "文化、体育和娱乐业"),
    ("环保科技", "水利、环境和公共设施管理业"),
    ("教育咨询", "教育"),
    ("置业", "房地产业"),
    ("物业服务", "房地产业"),
    ("供应链管理", "租赁和商务服务业"),
    ("企业管理咨询", "租赁和商务服务业"),
    ("农业发展", "农、林、牧、渔业"),
    ("新能源", "电力、热力、燃气及水生产和供应业"),
    ("健康管理", "卫生和社会工作"),
)
_NAME_SUFFIXES = ("有限公司", "股份有限公司", "有限责任公司")
_SUFFIX_WEIGHTS = (80, 8, 12)

_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘蔡蒋余杜叶程魏苏吕"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华建国志红文斌辉鹏飞宇浩然晨欣怡婷俊峰波琳"

_STATUSES = ("存续", "在业", "注销")
_STATUS_WEIGHTS = (85, 8, 7)
_CAPITALS = (10, 50, 100, 200, 300, 500, 1000, 2000, 3000, 5000, 10000, 50000)
_CAPITAL_WEIGHTS = (6, 10, 18, 12, 10, 14, 12, 7, 4, 4, 2, 1)

_STREETS = (
    "解放大道", "中山大道", "建设大道", "京汉大道", "发展大道", "武珞路", "珞喻路", "中北路",
    "和平大道", "友谊大道", "鹦鹉大道", "汉阳大道", "雄楚大道", "民族大道", "关山大道",
    "光谷大道", "高新大道", "徐东大街", "沿江大道", "新华路", "青年路", "常青路", "金桥大道",
    "东风大道", "江城大道", "文化大道", "黄孝河路", "三环线", "团结大道", "二七路",
)  # fmt: skip

# GB 11714 organisation code: weights and the values of its characters.
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)


def _rng(seed: int | str) -> random.Random:
    """A seeded generator: sample data must be reproducible, not unpredictable."""
    return random.Random(seed)  # noqa: S311


def _org_code(rng: random.Random, modern: bool) -> str:
    """A 9-character organisation code (GB 11714) with its check character.

    Codes issued since the 2015 reform start with ``MA``; older ones are digits.
    """
    if modern:
        body = "MA" + "".join(rng.choice(ALPHABET) for _ in range(6))
    else:
        body = "".join(rng.choice("0123456789") for _ in range(8))
    values = (int(ch) if ch.isdigit() else ord(ch) - 55 for ch in body)  # A=10 ... Z=35
    total = sum(v * w for v, w in zip(values, _ORG_WEIGHTS, strict=True))
    check = 11 - total % 11
    return body + ("X" if check == 10 else "0" if check == 11 else str(check))


def _person(rng: random.Random) -> str:
    given = rng.choice(_GIVEN)
    if rng.random() < 0.7:
        given += rng.choice(_GIVEN)
    return rng.choice(_SURNAMES) + given


@functools.cache
def _enterprises() -> tuple[Enterprise, ...]:
    rng = _rng(20_151_001)  # GB 32100-2015 took effect on 2015-10-01
    names: set[str] = set()
    codes: set[str] = set()
    out: list[Enterprise] = []
    first_day = date(1995, 1, 1).toordinal()
    last_day = date(2025, 12, 31).toordinal()
    while len(out) < 500:
        trade, industry = rng.choice(_NAME_TRADES)
        suffix = rng.choices(_NAME_SUFFIXES, _SUFFIX_WEIGHTS)[0]
        name = f"武汉{rng.choice(_NAME_PLACES)}{rng.choice(_NAME_WORDS)}{trade}{suffix}"
        if name in names:
            continue
        district, division = rng.choices(_DISTRICTS, _DISTRICT_WEIGHTS)[0]
        established = date.fromordinal(rng.randint(first_day, last_day))
        code = with_check_character("91" + division + _org_code(rng, established.year >= 2016))
        if code in codes:
            continue
        names.add(name)
        codes.add(code)
        out.append(
            Enterprise(
                credit_code=code,
                name=name,
                legal_representative=_person(rng),
                registered_capital=rng.choices(_CAPITALS, _CAPITAL_WEIGHTS)[0],
                establishment_date=established.isoformat(),
                district=district,
                industry=industry,
                status=rng.choices(_STATUSES, _STATUS_WEIGHTS)[0],
                address=f"湖北省武汉市{district}{rng.choice(_STREETS)}{rng.randint(1, 999)}号",
            )
        )
    return tuple(out)


@functools.cache
def _enterprises_by_code() -> dict[str, Enterprise]:
    return {e["credit_code"]: e for e in _enterprises()}


# ---------------------------------------------------------------------------- weather

_STATIONS: tuple[Station, ...] = (
    Station(id="57494", name="武汉", district="东西湖区", lat=30.6167, lon=114.1333, altitude_m=23.6),
    Station(id="57480", name="江岸", district="江岸区", lat=30.6350, lon=114.3060, altitude_m=24.1),
    Station(id="57481", name="江汉", district="江汉区", lat=30.6010, lon=114.2710, altitude_m=22.8),
    Station(id="57483", name="汉阳", district="汉阳区", lat=30.5500, lon=114.2180, altitude_m=26.0),
    Station(id="57484", name="武昌", district="武昌区", lat=30.5540, lon=114.3160, altitude_m=31.2),
    Station(id="57485", name="青山", district="青山区", lat=30.6400, lon=114.3850, altitude_m=21.5),
    Station(id="57486", name="洪山", district="洪山区", lat=30.5030, lon=114.3430, altitude_m=35.4),
    Station(id="57487", name="光谷", district="洪山区", lat=30.4820, lon=114.4150, altitude_m=38.7),
    Station(id="57489", name="蔡甸", district="蔡甸区", lat=30.5820, lon=114.0290, altitude_m=25.3),
    Station(id="57490", name="江夏", district="江夏区", lat=30.3750, lon=114.3210, altitude_m=36.0),
    Station(id="57491", name="黄陂", district="黄陂区", lat=30.8820, lon=114.3750, altitude_m=31.8),
    Station(id="57492", name="新洲", district="新洲区", lat=30.8420, lon=114.8010, altitude_m=29.4),
)
_STATION_IDS = frozenset(s["id"] for s in _STATIONS)
# Urban stations are a little warmer (heat island).
_URBAN = frozenset({"57480", "57481", "57483", "57484", "57485", "57486"})

_COMPASS = ("北", "东北", "东", "东南", "南", "西南", "西", "西北")


def _day_weather(day: date) -> tuple[float, bool, int, int, float]:
    """Weather of the whole city on ``day``: (anomaly °C, rain, rain start, rain hours, wind deg)."""
    rng = _rng(f"wuhan-weather:{day.isoformat()}")
    doy = day.timetuple().tm_yday
    summer = -math.cos(2 * math.pi * (doy - 15) / 365.25)  # -1 mid-January .. +1 mid-July
    anomaly = rng.gauss(0.0, 2.2)
    rain = rng.random() < 0.31 + 0.12 * summer
    if rain:
        anomaly -= 1.5
    rain_start = rng.randrange(24)
    rain_hours = rng.randint(2, 10)
    # Prevailing winds: northeast in winter, southeast to south in summer.
    prevailing = 45.0 + 100.0 * (summer + 1) / 2
    wind_deg = (prevailing + rng.gauss(0.0, 50.0)) % 360
    return anomaly, rain, rain_start, rain_hours, wind_deg


@functools.lru_cache(maxsize=4096)
def _observations(station: str, day: date) -> tuple[Observation, ...]:
    anomaly, rain, rain_start, rain_hours, wind_deg = _day_weather(day)
    rng = _rng(f"wuhan-weather:{station}:{day.isoformat()}")
    doy = day.timetuple().tm_yday
    season = math.cos(2 * math.pi * (doy - 15) / 365.25)  # +1 mid-January .. -1 mid-July
    mean = 16.9 - 12.5 * season + anomaly + (0.6 if station in _URBAN else 0.0) + rng.gauss(0.0, 0.3)
    amplitude = (2.5 if rain else 4.5) + rng.uniform(-0.5, 0.5)
    base_rh = 76.0 + (14.0 if rain else 0.0) + rng.gauss(0.0, 3.0)
    base_pressure = 1014.0 + 11.5 * season - (4.0 if rain else 0.0) + rng.gauss(0.0, 1.5)
    base_wind = rng.uniform(1.2, 3.2) + (1.0 if rain else 0.0)
    station_deg = wind_deg + rng.gauss(0.0, 15.0)
    out: list[Observation] = []
    for hour in range(24):
        # Diurnal curve: minimum around 05-06h, maximum around 14-15h.
        phase = 2 * math.pi * (hour - 14.5) / 24
        diurnal = math.cos(phase) + 0.2 * math.cos(2 * phase)
        temperature = mean + amplitude * diurnal / 1.2 + rng.gauss(0.0, 0.25)
        humidity = base_rh - 12.0 * diurnal + rng.gauss(0.0, 2.0)
        wind = base_wind + 0.8 * max(0.0, diurnal) + rng.gauss(0.0, 0.4)
        deg = round(station_deg + rng.gauss(0.0, 20.0)) % 360
        in_rain = rain and (hour - rain_start) % 24 < rain_hours
        precipitation = rng.expovariate(1 / 2.5) if in_rain else 0.0
        # Semi-diurnal pressure tide: highs near 10h and 22h.
        pressure = base_pressure + 0.8 * math.cos(2 * math.pi * (hour - 10) / 12) + rng.gauss(0.0, 0.2)
        out.append(
            Observation(
                station=station,
                time=datetime(day.year, day.month, day.day, hour, tzinfo=_CST).isoformat(),
                temperature_c=round(temperature, 1),
                humidity_pct=max(20, min(100, round(humidity + (8.0 if in_rain else 0.0)))),
                wind_speed_ms=round(max(0.0, wind), 1),
                wind_direction=_COMPASS[round(deg / 45) % 8],
                wind_direction_deg=deg,
                precipitation_mm=round(precipitation, 1),
                pressure_hpa=round(pressure, 1),
            )
        )
    return tuple(out)


# -------------------------------------------------------------------------------- bus

# Landmarks that serve as termini and waypoints: (name, lat, lon).
_LANDMARKS: tuple[tuple[str, float, float], ...] = (
    ("汉口火车站", 30.6185, 114.2553),
    ("武汉火车站", 30.6075, 114.4240),
    ("武昌火车站", 30.5295, 114.3170),
    ("江汉路", 30.5800, 114.2890),
    ("中山公园", 30.5920, 114.2660),
    ("循礼门", 30.5880, 114.2780),
    ("武汉广场", 30.5870, 114.2700),
    ("六渡桥", 30.5740, 114.2800),
    ("武胜路", 30.5680, 114.2600),
    ("宗关", 30.5770, 114.2240),
    ("古田二路", 30.5940, 114.1990),
    ("三阳路", 30.6010, 114.3050),
    ("黄浦路", 30.6150, 114.3140),
    ("后湖大道", 30.6450, 114.2900),
    ("堤角", 30.6560, 114.3240),
    ("金银潭", 30.6560, 114.2550),
    ("常青花园", 30.6400, 114.2330),
    ("吴家山", 30.6430, 114.1450),
    ("钟家村", 30.5500, 114.2630),
    ("王家湾", 30.5540, 114.2190),
    ("琴台", 30.5590, 114.2600),
    ("汉阳火车站", 30.5580, 114.2380),
    ("四新", 30.5130, 114.2350),
    ("墨水湖", 30.5310, 114.2270),
    ("沌口", 30.4950, 114.1650),
    ("体育中心", 30.5010, 114.1900),
    ("黄鹤楼", 30.5450, 114.3030),
    ("司门口", 30.5470, 114.2990),
    ("首义广场", 30.5390, 114.3040),
    ("小东门", 30.5480, 114.3140),
    ("大东门", 30.5400, 114.3170),
    ("积玉桥", 30.5680, 114.3080),
    ("徐家棚", 30.5900, 114.3340),
    ("中北路", 30.5610, 114.3440),
    ("岳家嘴", 30.5800, 114.3650),
    ("水果湖", 30.5540, 114.3470),
    ("洪山广场", 30.5430, 114.3380),
    ("中南路", 30.5380, 114.3320),
    ("街道口", 30.5270, 114.3560),
    ("广埠屯", 30.5250, 114.3700),
    ("武汉大学", 30.5360, 114.3650),
    ("鲁巷", 30.5060, 114.4020),
    ("光谷广场", 30.5050, 114.3970),
    ("华中科技大学", 30.5130, 114.4200),
    ("关山大道", 30.4970, 114.4150),
    ("南湖", 30.4970, 114.3500),
    ("白沙洲", 30.4890, 114.2950),
    ("青山区政府", 30.6390, 114.3920),
    ("和平公园", 30.6290, 114.3860),
    ("武汉站东广场", 30.6070, 114.4330),
    ("盘龙城", 30.6990, 114.2670),
    ("汉口北", 30.7230, 114.3290),
    ("纸坊", 30.3560, 114.3220),
    ("庙山", 30.4500, 114.3420),
    ("阳逻", 30.6760, 114.5540),
    ("蔡甸城区", 30.5820, 114.0300),
)
_ROADS = (
    "解放大道", "中山大道", "建设大道", "京汉大道", "发展大道", "武珞路", "珞喻路", "中北路",
    "和平大道", "友谊大道", "鹦鹉大道", "汉阳大道", "雄楚大道", "民族大道", "关山大道",
    "光谷大道", "徐东大街", "沿江大道", "新华路", "青年路", "常青路", "金桥大道", "东风大道",
    "江城大道", "黄孝河路", "二七路", "姑嫂树路", "武青三干道", "友谊路", "珞狮路",
)  # fmt: skip
_CROSSINGS = (
    "常码头", "香港路", "同济医院", "姑嫂树", "三眼桥", "利济路", "汉西一路", "唐家墩",
    "新华家园", "万松园", "工农兵路", "杨汊湖", "二七小路", "塔子湖", "百步亭", "竹叶山",
    "石桥", "马场角", "螃蟹岬", "彭刘杨路", "紫阳路", "丁字桥", "傅家坡", "大成路",
    "卓刀泉", "虎泉", "杨家湾", "茶山刘", "民院路", "书城路", "晒湖", "梨园",
    "东亭", "欢乐谷", "建二路", "红钢城", "钢都花园", "园林路", "四美塘", "上海路",
    "永清街", "芦沟桥路", "建设二路", "德才里", "五里墩", "十升", "七里庙", "归元寺",
)  # fmt: skip

_LINE_NAMES = (
    "1路", "2路", "5路", "7路", "10路", "14路", "24路", "30路", "38路", "45路",
    "59路", "64路", "108路", "201路", "208路", "234路", "240路", "292路", "301路", "402路",
    "411路", "505路", "512路", "519路", "530路", "540路", "559路", "572路", "578路", "591路",
    "601路", "703路", "715路", "728路", "756路", "789路", "801路", "电车1路", "电车2路", "电车3路",
)  # fmt: skip
_OPERATORS = (
    "武汉市公共交通集团有限责任公司第一营运公司",
    "武汉市公共交通集团有限责任公司第二营运公司",
    "武汉市公共交通集团有限责任公司第三营运公司",
    "武汉市公共交通集团有限责任公司第四营运公司",
    "武汉市公共交通集团有限责任公司第五营运公司",
)
_TROLLEY_OPERATOR = "武汉市公共交通集团有限责任公司电车公司"
_SUBURBAN_OPERATOR = "武汉市公共交通集团有限责任公司郊区营运公司"


def _km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 6371.0 * 2 * math.asin(math.sqrt(a))


def _line_id(name: str) -> str:
    number = name.removeprefix("电车").removesuffix("路")
    return f"trolley-{number}" if name.startswith("电车") else number


def _route(rng: random.Random, n_stops: int) -> list[BusStop]:
    """A route of ``n_stops`` stops, about 0.6-0.9 km apart, through a few landmarks.

    Each leg between two landmarks runs along one road; stops near a landmark take
    its name, the others are named after the road and a cross street (``解放大道香港路``).
    """
    start = rng.choice(_LANDMARKS)
    waypoints = [start]
    wanted_km = (n_stops - 1) * rng.uniform(0.6, 0.9)
    length = 0.0
    while length < wanted_km * 0.8 and len(waypoints) < 6:
        here = waypoints[-1]
        near = [
            lm
            for lm in _LANDMARKS
            if lm not in waypoints and 2.0 <= _km(here[1], here[2], lm[1], lm[2]) <= 10.0
        ]
        if not near:
            break
        nxt = rng.choice(near)
        waypoints.append(nxt)
        length += _km(here[1], here[2], nxt[1], nxt[2])
    if len(waypoints) == 1:  # an isolated landmark: go to the nearest other one
        others = (lm for lm in _LANDMARKS if lm != start)
        waypoints.append(min(others, key=lambda lm: _km(start[1], start[2], lm[1], lm[2])))
    legs = [_km(a[1], a[2], b[1], b[2]) for a, b in itertools.pairwise(waypoints)]
    roads = [rng.choice(_ROADS) for _ in legs]
    total = sum(legs)
    names: set[str] = set()
    stops: list[BusStop] = []
    for i in range(n_stops):
        # Position along the route, then the leg it falls on.
        dist = total * i / (n_stops - 1)
        leg = 0
        while leg < len(legs) - 1 and dist > legs[leg]:
            dist -= legs[leg]
            leg += 1
        frac = min(1.0, dist / legs[leg]) if legs[leg] else 0.0
        a, b = waypoints[leg], waypoints[leg + 1]
        lat = a[1] + (b[1] - a[1]) * frac
        lon = a[2] + (b[2] - a[2]) * frac
        landmark = min(waypoints, key=lambda lm: _km(lat, lon, lm[1], lm[2]))
        close = _km(lat, lon, landmark[1], landmark[2]) < (0.05 if i in (0, n_stops - 1) else 0.35)
        if close and landmark[0] not in names:
            name = landmark[0]
        else:
            lat += rng.gauss(0.0, 0.0008)
            lon += rng.gauss(0.0, 0.0008)
            name = f"{roads[leg]}{rng.choice(_CROSSINGS)}"
            while name in names:
                name = f"{rng.choice(_ROADS)}{rng.choice(_CROSSINGS)}"
        names.add(name)
        stops.append(BusStop(seq=i + 1, name=name, lat=round(lat, 6), lon=round(lon, 6)))
    return stops


@functools.cache
def _bus_lines() -> tuple[BusLine, ...]:
    rng = _rng(19_070_501)
    out: list[BusLine] = []
    for name in _LINE_NAMES:
        trolley = name.startswith("电车")
        number = int(name.removeprefix("电车").removesuffix("路"))
        suburban = not trolley and number >= 700
        stops = _route(rng, rng.randint(10, 30))
        length = sum(_km(a["lat"], a["lon"], b["lat"], b["lon"]) for a, b in itertools.pairwise(stops))
        if trolley:
            operator, fare = _TROLLEY_OPERATOR, 1.5
        elif suburban:
            operator, fare = _SUBURBAN_OPERATOR, rng.choice((2.0, 3.0, 4.0))
        else:
            operator, fare = _OPERATORS[number % len(_OPERATORS)], rng.choice((2.0, 2.0, 2.0, 1.5))
        first = 5 * 60 + 30 + 10 * rng.randint(0, 6)
        last = 21 * 60 + 10 * rng.randint(0, 12)
        out.append(
            BusLine(
                id=_line_id(name),
                name=name,
                operator=operator,
                first_bus=f"{first // 60:02d}:{first % 60:02d}",
                last_bus=f"{last // 60:02d}:{last % 60:02d}",
                fare_yuan=fare,
                origin=stops[0]["name"],
                terminus=stops[-1]["name"],
                stop_count=len(stops),
                length_km=round(length, 1),
                stops=stops,
            )
        )
    return tuple(out)


@functools.cache
def _bus_lines_by_key() -> dict[str, BusLine]:
    index: dict[str, BusLine] = {}
    for line in _bus_lines():
        index[line["id"]] = line
        index[line["name"]] = line
    return index


def _summary(line: BusLine) -> dict[str, Any]:
    return {k: v for k, v in line.items() if k != "stops"}


# --------------------------------------------------------------------------- handlers


def _json(data: object, status: int = 200) -> web.Response:
    response = web.Response(body=orjson.dumps(data), status=status, content_type=_JSON, charset="utf-8")
    if isinstance(data, list | tuple):
        response.headers["X-Record-Count"] = str(len(data))
    elif status < 400:
        response.headers["X-Record-Count"] = "1"
    return response


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


def _int_param(request: web.Request, name: str, default: int) -> int | None:
    raw = request.query.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


async def _enterprise_list(request: web.Request) -> web.Response:
    page = _int_param(request, "page", 1)
    size = _int_param(request, "size", _DEFAULT_PAGE_SIZE)
    if page is None or size is None:
        return _error(400, "page and size must be positive integers")
    size = min(size, _MAX_PAGE_SIZE)
    name = request.query.get("name", "").strip().casefold()
    district = request.query.get("district", "").strip()
    matches = [
        e
        for e in _enterprises()
        if (not name or name in e["name"].casefold())
        and (not district or district in _district_keys(e["district"]))
    ]
    return _json(matches[(page - 1) * size : page * size])


@functools.cache
def _district_keys(district: str) -> frozenset[str]:
    """The ways a district may be named in a query: 洪山区, 洪山 or 420111."""
    codes = [code for name, code in _DISTRICTS if name == district]
    return frozenset({district, district.removesuffix("区"), *codes})


async def _enterprise_get(request: web.Request) -> web.Response:
    code = request.match_info["credit_code"].strip().upper()
    enterprise = _enterprises_by_code().get(code)
    if enterprise is None:
        return _error(404, "not found")
    return _json(enterprise)


async def _station_list(request: web.Request) -> web.Response:
    return _json(list(_STATIONS))


async def _observation_list(request: web.Request) -> web.Response:
    station = request.query.get("station", "").strip()
    if not station:
        return _error(400, "the station parameter is required")
    if station not in _STATION_IDS:
        return _error(400, f"unknown station: {station}")
    raw_date = request.query.get("date", "").strip()
    if raw_date:
        try:
            day = date.fromisoformat(raw_date)
        except ValueError:
            return _error(400, f"invalid date (expected YYYY-MM-DD): {raw_date}")
    else:
        day = datetime.now(_CST).date()
    return _json(list(_observations(station, day)))


async def _bus_line_list(request: web.Request) -> web.Response:
    return _json([_summary(line) for line in _bus_lines()])


def _find_line(request: web.Request) -> BusLine | None:
    return _bus_lines_by_key().get(request.match_info["line_id"].strip())


async def _bus_line_get(request: web.Request) -> web.Response:
    line = _find_line(request)
    return _error(404, "not found") if line is None else _json(line)


async def _bus_stop_list(request: web.Request) -> web.Response:
    line = _find_line(request)
    return _error(404, "not found") if line is None else _json(line["stops"])


async def _index(request: web.Request) -> web.Response:
    return _json(
        [
            {"id": d.id, "name": d.name, "prefix": d.prefix, "example": f"{d.prefix}/{d.example_path}"}
            for d in SAMPLE_DATASETS
        ]
    )


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn aiohttp's plain-text 404/405 into JSON errors."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _error(404, "not found")
    except web.HTTPMethodNotAllowed as exc:
        response = _error(405, "method not allowed")
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response


def sample_app() -> web.Application:
    """The aiohttp application serving all three sample services."""
    ent, weather, bus = (d.prefix for d in SAMPLE_DATASETS)
    app = web.Application(middlewares=[_json_errors])
    app.router.add_get("/", _index)
    app.router.add_get(f"{ent}/enterprises", _enterprise_list)
    app.router.add_get(f"{ent}/enterprises/{{credit_code}}", _enterprise_get)
    app.router.add_get(f"{weather}/stations", _station_list)
    app.router.add_get(f"{weather}/observations", _observation_list)
    app.router.add_get(f"{bus}/lines", _bus_line_list)
    app.router.add_get(f"{bus}/lines/{{line_id}}", _bus_line_get)
    app.router.add_get(f"{bus}/lines/{{line_id}}/stops", _bus_stop_list)
    return app


async def start_sample_upstream(host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve :func:`sample_app` on ``host:port`` (0: a free port); return the runner and the bound port.

    The caller stops the server with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(sample_app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound
